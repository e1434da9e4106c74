import os
import signal


def _stop_now(signum: int, frame: object) -> None:
    """Ctrl-C or SIGTERM while torch and Lightning are imported (seconds, before main() handles signals): nothing
    was written yet. It ends the process at once: a KeyboardInterrupt raised inside torch's C++ import code could
    abort it (status 134, a C++ message) instead of stopping it."""
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    os.write(2, f"{name}: stopped before any work; nothing was written.\n".encode())
    os._exit(128 + signum)


for _signum in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(_signum) is not signal.SIG_IGN:  # ignored (a shell's background job): left so
        signal.signal(_signum, _stop_now)

from senet_pl.cli import main  # noqa: E402  (after the handlers: the import is what takes seconds)

main()

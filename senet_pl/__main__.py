import sys

try:  # torch and Lightning take seconds to import, before main() installs its signal handlers
    from senet_pl.cli import main
except KeyboardInterrupt:
    print("Ctrl-C: stopped before any work; nothing was written.", file=sys.stderr)
    sys.exit(130)  # 128 + SIGINT, as after a Ctrl-C later on

main()

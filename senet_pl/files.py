"""Files this project writes beside a target and renames into place (checkpoints, decompressed data)."""

import os
from pathlib import Path


def umask() -> int:
    """The process's umask, read from /proc where Linux shows it: setting the umask to read it back
    would change it for a moment for every thread of the process (the fallback sets a strict one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def give_default_mode(path: str | Path) -> None:
    """``tempfile.mkstemp`` creates files 0600; give ``path`` the mode ``open()`` would have given it."""
    os.chmod(path, 0o666 & ~umask())

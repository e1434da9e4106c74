"""The command line's errors: the parser's, shortened, and option values that the CLI's types cannot refuse on their
own, each refused in one line before any work."""

import re
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from senet_pl.model import MIN_IMAGE_SIZE
from senet_pl.runs import CLIError

MAX_SEED = 2**32 - 1  # numpy's limit, which seed_everything passes the seed to

# jsonargparse's report on an option's value that fits none of a Union's types (int | None ...): 7 lines for "not an
# int". A Union of classes (--model.optimizer) nests its reports in another message: not matched, kept as it is.
PLAIN_UNION_ERROR = re.compile(
    r"(?P<key>Parser key \"[^\"]+\"):\n\s+Does not validate against any of the Union subtypes\n"
    r"\s+Subtypes: \[(?P<types>(?:(?:<class '[\w.]+'>|typing\.Literal\[[^\]]*\])(?:, )?)+)\]\n"
    r"\s+Errors:\n(?P<errors>(?:\s+- .*\n)+)"
    r"\s+Given value type: .*\n\s+Given value: (?P<value>.*)$")


def short_union_error(message: str) -> str:
    """A Union's error in one line: ``Parser key "trainer.max_epochs": expected int or null, got 'abc'``, with the
    reasons that say more than "Expected a <class 'int'>" (a range ...) after it; any other message as it is."""
    found = PLAIN_UNION_ERROR.search(message)
    if found is None:
        return message
    types = re.findall(r"<class '([\w.]+)'>|typing\.Literal\[([^\]]*)\]", found["types"])
    names = ["null" if name == "NoneType" else name.rsplit(".", 1)[-1] if name else values for name, values in types]
    expected = f"one of {', '.join(names)}" if any(values for _, values in types) else " or ".join(names)
    reasons = [line.strip()[2:] for line in found["errors"].splitlines()]
    said = "; ".join(r for r in reasons if not re.fullmatch(r"Expected a (<class '[\w.]+'>|typing\.Literal\[.*\])", r))
    return (f"{message[:found.start()]}{found['key']}: expected {expected}, got {found['value']!r}"
            + (f" ({said})" if said else ""))


class ShortErrorParser(LightningArgumentParser):
    """Bad options get the error and a pointer to --help, not the usage line of every option (a page); a
    shortened option name is an error, not the option it abbreviates (--model.dept 34 would set depth)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def print_usage(self, file=None) -> None:
        pass

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(short_union_error(message), ex)


def check_seed(seed: Any) -> None:
    """``--seed_everything``: an int must be one that numpy accepts (True, a random one, and None pass)."""
    if type(seed) is int and not 0 <= seed <= MAX_SEED:
        raise CLIError(f"--seed_everything {seed} is out of range: use a seed from 0 to {MAX_SEED} (or true for a random one).")


def check_options(cfg: Any, subcommand: str | None, root: Path | None) -> None:
    """Raise CLIError for the first value of ``cfg`` (one subcommand's parsed config) that cannot work.
    ``root``: the logger's folder of runs (save_dir/name), if it has one."""
    smallest = MIN_IMAGE_SIZE[cfg.model.stem]
    if cfg.data.image_size < smallest:
        raise CLIError(
            f"--data.image_size {cfg.data.image_size} is too small for --model.stem {cfg.model.stem}, which "
            f"downsamples by {smallest}: use an image_size of at least {smallest}"
            + (", or --model.stem cifar." if cfg.model.stem == "imagenet" else ".")
        )
    trainer = cfg.trainer
    limit = {"validate": "limit_val_batches", "test": "limit_test_batches", "analyze": "limit_test_batches",
             "predict": "limit_predict_batches"}.get(subcommand)
    if limit is not None and trainer.get(limit) == 0:  # 0 or 0.0: Lightning would report success with no results
        raise CLIError(f"--trainer.{limit} {trainer.get(limit)}: {subcommand} would evaluate nothing; give a number of "
                       "batches (at least 1) or a fraction of the split (0.5, 1.0).")
    if subcommand == "fit":
        if trainer.max_epochs is not None and trainer.max_epochs < -1:
            raise CLIError(f"--trainer.max_epochs {trainer.max_epochs}: give a number of epochs (or -1 for no limit).")
        if 0 in (trainer.max_epochs, trainer.max_steps):
            option = "max_epochs" if trainer.max_epochs == 0 else "max_steps"
            raise CLIError(f"--trainer.{option} 0 trains nothing: give at least 1 (or -1 for no limit).")
        if trainer.limit_train_batches == 0:  # 0 or 0.0
            raise CLIError(f"--trainer.limit_train_batches {trainer.limit_train_batches} trains nothing: give a number "
                           "of batches (at least 1) or a fraction of the epoch (0.5, 1.0).")
        if trainer.val_check_interval == 0:  # Lightning would divide by it after the first step
            raise CLIError(f"--trainer.val_check_interval {trainer.val_check_interval}: give a number of training "
                           "batches (at least 1) or a fraction of the epoch (0.5, 1.0).")
        if trainer.max_time is not None:
            try:
                Timer(duration=trainer.max_time)
            except (ValueError, TypeError, MisconfigurationException):
                raise CLIError(f"--trainer.max_time {trainer.max_time}: write a duration as DD:HH:MM:SS "
                               "(00:01:30:00 is 90 minutes) or as {minutes: 90}.") from None
    for folder in (*reversed(root.parents), root) if root is not None else ():
        if folder.exists() and not folder.is_dir():
            raise CLIError(
                f"{folder} is a file, but the logger keeps its runs in that folder: move the file "
                "away, or choose another --trainer.logger.init_args.save_dir (or .name)."
            )

"""The command line's errors: the parser's, shortened, and option values that the CLI's types cannot refuse on their
own, each refused in one line before any work."""

import re
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.callbacks import Timer
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from senet_pl.compat import clips_in_the_optimizer
from senet_pl.model import MIN_IMAGE_SIZE
from senet_pl.runs import CLIError, named_run_folder
from senet_pl.schedule import EPOCH_METRICS

MAX_SEED = 2**32 - 1  # numpy's limit, which seed_everything passes the seed to

# jsonargparse's report on an option's value that fits none of a Union's types (int | None ...): 7 lines for "not an
# int". A Union of classes (--model.optimizer) nests its reports in another message: not matched, kept as it is.
PLAIN_UNION_ERROR = re.compile(
    r"(?P<key>Parser key \"[^\"]+\"):\n\s+Does not validate against any of the Union subtypes\n"
    r"\s+Subtypes: \[(?P<types>(?:(?:<class '[\w.]+'>|typing\.Literal\[[^\]]*\])(?:, )?)+)\]\n"
    r"\s+Errors:\n(?P<errors>(?:\s+- .*\n)+)"
    r"\s+Given value type: .*\n\s+Given value: (?P<value>.*)$")
# Its report on a value of one type, in 2 lines: the key, then "Expected a <class 'bool'>. Got value: maybe",
# "Expected a typing.Literal[18, 34]. Got value: 19" or "Not of type PositiveInt: 0 does not conform to restriction v>0".
PLAIN_ERROR = re.compile(
    r"(?P<key>Parser key \"[^\"]+\"):\n\s+(?:Expected a (?P<type><class '[\w.]+'>|typing\.Literal\[[^\]]*\])\. "
    r"Got value: (?P<value>.*)|(?P<restricted>Not of type \w+: (?P<given>.*) does not conform to restriction .*)"
    r"|Not of type (?P<name>\w+): (?P<why>.*))$")
TYPE = re.compile(r"<class '([\w.]+)'>|typing\.Literal\[([^\]]*)\]")
RESTRICTED = re.compile(r"Not of type (\w+):.* does not conform to restriction (.+)")
# A short class name (--model.lr_scheduler ReduceLROnPlateau) that two importable classes share: torch's and Lightning's.
AMBIGUOUS = re.compile(r"Multiple subclasses with name (?P<name>\w+)\. Give the full class path to avoid ambiguity: "
                       r"(?P<paths>[\w., ]+)\.")
CONDITION, SPACED = re.compile(r"v\s*([<>=]+)\s*"), r"\1 "  # "v>0 and v<1" -> "> 0 and < 1"
# jsonargparse's restricted types, named as a user reads them when the value is not even a number (2.5, abc)
NAMED = {"PositiveInt": "an int > 0", "NonNegativeInt": "an int >= 0", "PositiveFloat": "a number > 0",
         "NonNegativeFloat": "a number >= 0", "OpenUnitInterval": "a number > 0 and < 1",
         "ClosedUnitInterval": "a number >= 0 and <= 1"}
# ... and its reason then: Python's own words on the text it could not convert
NOT_A_NUMBER = re.compile(r"(?:Not of type \w+: )?(?:invalid literal for int\(\) with base 10|could not convert "
                          r"string to float): (?P<given>'.*')")


def _expected(type_: str) -> str:
    """A type as jsonargparse prints it, as a user reads it: ``int``, ``null``, ``one of 18, 34``."""
    name, values = TYPE.fullmatch(type_).groups()
    return f"one of {values}" if values else "null" if name == "NoneType" else name.rsplit(".", 1)[-1]


def _restricted(reason: str) -> str | None:
    """``Not of type PositiveInt: ... restriction v>0 and v<1`` as ``an int > 0 and < 1`` (None: another reason)."""
    found = RESTRICTED.fullmatch(reason)
    if found is None:
        return None
    kind = "an int" if found[1].endswith("Int") else "a number"
    return f"{kind} {CONDITION.sub(SPACED, found[2])}"


def short_error(message: str) -> str:
    """jsonargparse's report on a plain option's value in one line: ``Parser key "trainer.max_epochs": expected int
    or null, got 'abc'``; a range as ``expected an int > 0, got 0``; reasons that say more than "Expected a <class
    'int'>" after it; a short class name that two classes share as a choice between their paths. Any other message
    (a class option's nested report ...) as it is."""
    if message.startswith("Unexpected config:"):  # a --config file that is empty, only comments, a list or a string
        held = [line for line in message.removeprefix("Unexpected config:").strip().splitlines()
                if line.strip() and not line.strip().startswith("#")]
        what = f"it holds {held[0].strip()!r}{' ...' if len(held) > 1 else ''}" if held else "it is empty or only comments"
        return f"a --config file holds no settings ({what}): write them as YAML keys, e.g. trainer: {{max_epochs: 5}}."
    found = PLAIN_ERROR.fullmatch(message.strip())  # the whole message: not a class option's nested report
    if found is not None:
        head = f"{found['key']}: expected "
        if found["name"]:  # not even of the restricted type's base type (2.5 for a PositiveInt)
            given = NOT_A_NUMBER.fullmatch(found["why"])
            if found["name"] in NAMED and given is not None:
                return f"{head}{NAMED[found['name']]}, got {given['given']}"
            return f"{head}{found['name']} ({found['why']})"
        if found["restricted"]:
            return f"{head}{_restricted(found['restricted'])}, got {found['given']!r}"
        return f"{head}{_expected(found['type'])}, got {found['value']!r}"
    found = PLAIN_UNION_ERROR.search(message)
    ambiguous = AMBIGUOUS.search(message)
    key = re.match(r"Parser key \"[^\"]+\"", message)
    if ambiguous is not None and key is not None:
        paths = ambiguous["paths"].split(", ")
        return (f"{key[0]}: {ambiguous['name']} names {len(paths)} classes: give the full class path, "
                f"{' or '.join(paths)}.")
    if found is None:
        return message
    reasons = [line.strip()[2:] for line in found["errors"].splitlines()]
    ranges = {m[1]: _restricted(m[0]) for m in map(RESTRICTED.fullmatch, reasons) if m}  # type name -> its range
    values, others = [], []
    for type_ in TYPE.finditer(found["types"]):
        if type_[2]:
            values.append(type_[2])
        else:
            name = type_[1].rsplit(".", 1)[-1]
            others.append(ranges.get(name) or NAMED.get(name) or _expected(type_[0]))
    expected = f"one of {', '.join(values + others)}" if values else " or ".join(others)
    said = "; ".join(r for r in reasons if not RESTRICTED.fullmatch(r) and not NOT_A_NUMBER.fullmatch(r)
                     and not re.fullmatch(f"Expected a (?:{TYPE.pattern})", r))
    return (f"{message[:found.start()]}{found['key']}: expected {expected}, got {found['value']!r}"
            + (f" ({said})" if said else ""))


class ShortErrors:
    """For a jsonargparse parser: bad options get the error and a pointer to --help, not the usage line of every
    option (a page); a shortened option name is an error, not the option it abbreviates (--model.dept 34 would set
    depth)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def print_usage(self, file=None) -> None:
        pass

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(short_error(message), ex)


class ShortErrorParser(ShortErrors, LightningArgumentParser):
    """LightningCLI's parser with short errors."""


# Trainer settings that Lightning takes without a check, each with the smallest value that works and what it means.
# Below it Lightning would run and do something no one asks for: accumulate_grad_batches 0 divides by zero, -2
# accumulates 2; check_val_every_n_epoch 0 divides by zero, -1 validates every epoch; a negative gradient_clip_val
# turns the gradients around; num_sanity_val_steps -5 checks nothing; log_every_n_steps -1 logs every step.
SMALLEST = {
    "accumulate_grad_batches": (1, "give the number of batches whose gradients make one optimizer step (at least 1)"),
    "check_val_every_n_epoch": (1, "give a number of epochs between validations (at least 1), or null to validate "
                                   "every --trainer.val_check_interval training batches"),
    "log_every_n_steps": (0, "give a number of steps between logged training metrics (at least 1; 0 logs none)"),
    "num_sanity_val_steps": (-1, "give a number of validation batches to run before training (0 for none, -1 for all)"),
    "gradient_clip_val": (0, "give the largest gradient norm (or value, with --trainer.gradient_clip_algorithm value) "
                             "to allow, or 0 for no clipping"),
    "min_epochs": (0, "give a number of epochs to train at least (0 for no minimum)"),
    "min_steps": (0, "give a number of steps to train at least (0 for no minimum)"),
}


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
    if subcommand in ("validate", "test", "analyze", "export") and cfg.data.get("predict_dir"):  # silently unused
        split = "validation" if subcommand == "validate" else "official test"
        warnings.warn(f"--data.predict_dir is read by predict only: {subcommand} uses the {split} split.", UserWarning)
    mirrored = ("--data.hflip" if subcommand == "fit" and cfg.data.get("hflip") else
                "--model.test_hflip" if subcommand == "test" and cfg.model.get("test_hflip") else None)
    if mirrored and cfg.data.dataset != "fashion_mnist":  # allowed (a user may want to see it), but said
        warnings.warn(f"{mirrored} on {cfg.data.dataset}: a mirrored digit or character is another symbol (or none); "
                      "mirror images suit clothes (fashion_mnist).", UserWarning)
    if limit is not None and trainer.get(limit) == 0:  # 0 or 0.0: Lightning would report success with no results
        raise CLIError(f"--trainer.{limit} {trainer.get(limit)}: {subcommand} would evaluate nothing; give a number of "
                       "batches (at least 1) or a fraction of the split (0.5, 1.0).")
    if subcommand == "fit":
        if trainer.max_epochs is not None and trainer.max_epochs < -1:
            raise CLIError(f"--trainer.max_epochs {trainer.max_epochs}: give a number of epochs (or -1 for no limit).")
        if trainer.max_epochs is None and trainer.max_steps in (None, -1) and trainer.max_time is None:
            raise CLIError("--trainer.max_epochs null sets no length (Lightning would train 1000 epochs): give a number "
                           "of epochs, --trainer.max_steps or --trainer.max_time, or -1 for no limit.")
        if 0 in (trainer.max_epochs, trainer.max_steps):
            option = "max_epochs" if trainer.max_epochs == 0 else "max_steps"
            raise CLIError(f"--trainer.{option} 0 trains nothing: give at least 1 (or -1 for no limit).")
        if trainer.limit_train_batches == 0:  # 0 or 0.0
            raise CLIError(f"--trainer.limit_train_batches {trainer.limit_train_batches} trains nothing: give a number "
                           "of batches (at least 1) or a fraction of the epoch (0.5, 1.0).")
        if trainer.val_check_interval == 0:  # Lightning would divide by it after the first step
            raise CLIError(f"--trainer.val_check_interval {trainer.val_check_interval}: give a number of training "
                           "batches (at least 1) or a fraction of the epoch (0.5, 1.0).")
        for option, (smallest, how) in SMALLEST.items():
            value = trainer.get(option)
            if value is not None and not value >= smallest:  # NaN too (.nan in a YAML file)
                raise CLIError(f"--trainer.{option} {value}: {how}.")
        if trainer.max_time is not None:
            try:
                Timer(duration=trainer.max_time)
            except (ValueError, TypeError, MisconfigurationException):
                raise CLIError(f"--trainer.max_time {trainer.max_time}: write a duration as DD:HH:MM:SS "
                               "(00:01:30:00 is 90 minutes) or as {minutes: 90}.") from None
            if _seconds(trainer.max_time) <= 0:
                raise CLIError(f"--trainer.max_time {trainer.max_time} trains nothing: give a duration of at least a "
                               "second (or leave it out).")
        monitor, mode = cfg.checkpoint.get("monitor"), cfg.checkpoint.get("mode")
        improves = EPOCH_METRICS.get(monitor, "min" if monitor and "loss" in monitor else None)
        if improves is not None and mode != improves:  # the best checkpoint would be the worst
            raise CLIError(f"--checkpoint.monitor {monitor} improves as it {'falls' if improves == 'min' else 'rises'}, "
                           f"but --checkpoint.mode is {mode}: give --checkpoint.mode {improves}.")
    for folder in (*reversed(root.parents), root) if root is not None else ():
        if folder.exists() and not folder.is_dir():
            raise CLIError(
                f"{folder} is a file, but the logger keeps its runs in that folder: move the file "
                "away, or choose another --trainer.logger.init_args.save_dir (or .name)."
            )
    logger = trainer.logger
    named = logger.init_args.get("version") if root is not None else None
    folder = named_run_folder(root, named)
    if subcommand == "fit" and not cfg.get("ckpt_path") and folder is not None and any(folder.glob("checkpoints/*.ckpt")):
        raise CLIError(f"--trainer.logger.init_args.version {named}: {folder} holds a run, whose checkpoints a new run "
                       f"would replace: resume it with --ckpt_path {folder / 'checkpoints' / 'last.ckpt'}, or leave the "
                       "version out (a new version_N is made).")
    version = logger.init_args.get("version") if root is not None and logger.class_path.endswith("CSVLogger") else None
    folder = named_run_folder(root, version)
    if folder is not None and (folder / "metrics.csv").exists():  # Lightning's CSV logger writes over it
        raise CLIError(f"--trainer.logger.init_args.version {version}: {folder} holds the metrics.csv of another "
                       "command, which the CSV logger would replace: leave the version out (a new version_N is made).")


def _seconds(duration: Any) -> float:
    """A max_time that Lightning's Timer accepted (DD:HH:MM:SS, a dict of timedelta's arguments, a timedelta)."""
    if isinstance(duration, str):
        days, hours, minutes, seconds = (int(part) for part in duration.strip().split(":"))
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds()
    return (duration if isinstance(duration, timedelta) else timedelta(**duration)).total_seconds()


def check_clipping(trainer: Any, optimizer: Any) -> None:
    """``--trainer.gradient_clip_val`` with a fused optimizer (the recipes' SGD) under mixed precision: Lightning
    refuses it at the first training step, with a traceback; refused here, before any data is read."""
    clip = trainer.gradient_clip_val
    if clip and isinstance(trainer.precision_plugin, MixedPrecision) and clips_in_the_optimizer(optimizer):
        raise CLIError(f"--trainer.gradient_clip_val {clip}: Lightning cannot clip the gradients of a fused optimizer "
                       f"under mixed precision ({trainer.precision}): give --model.optimizer.init_args.fused false, or "
                       "--trainer.precision 32-true.")

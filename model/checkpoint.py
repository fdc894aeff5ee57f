"""A checkpoint is the file a user hands over: weights, the full config, class names and a format version.

`train` keeps what `--resume` needs besides the weights (optimizer, schedule, iteration) in a second file
beside it, `NAME.train-state.pt` (`save_training`), so the shared file is the weights alone (190 MB for Swin-T
instead of 569 MB with AdamW's two moments per weight). The state file names the weights it was saved with,
and a resume refuses a state that does not belong to the weights beside it.

Loaded with `weights_only=True`, so a checkpoint can never run code; everything in it is plain data, and every
record's CRC32 is checked first (`check_intact`). torch is imported only where tensors are needed:
`read_checkpoint_header` gives the config and class names without it, so a `run` driver, which never touches
the weights, does not carry torch (~600 MB per process).
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.yaml_files import merge
from model.config import DEFAULTS, validate_model
from core.errors import UserError, first_line
from core.files import atomic_path

if TYPE_CHECKING:
    from torch import nn

FORMAT_VERSION = 1  # the weights file; files of this format written before the split also hold "training_state"
TRAIN_STATE_KIND = "train-state"
TRAIN_STATE_FORMAT = 1
REFUSED = "it contains Python objects that would run code when loaded; refused (weights_only=True)"


def save_checkpoint(path: str | Path, model: nn.Module, config: dict[str, Any], class_names: list[str]) -> None:
    """Write the weights file atomically: an interrupted save leaves the previous checkpoint intact."""
    import torch

    payload = {
        "format_version": FORMAT_VERSION,
        "config": config,
        "class_names": list(class_names),
        "model": model.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def train_state_path(weights: str | Path) -> Path:
    """Where `train` keeps the state to resume the weights file `weights` (model.pt -> model.train-state.pt)."""
    weights = Path(weights)
    return weights.with_name(weights.stem + ".train-state.pt")


def save_training(path: str | Path, model: nn.Module, config: dict[str, Any], class_names: list[str],
                  state: dict[str, Any]) -> None:
    """The weights file, then the training state beside it, each atomically. The state records the identity
    of the weights just written (`weights_id`), so a stop between the two writes is detected on resume."""
    import torch

    save_checkpoint(path, model, config, class_names)
    header = {"format_version": TRAIN_STATE_FORMAT, "kind": TRAIN_STATE_KIND, "weights": weights_id(Path(path))}
    with atomic_path(train_state_path(path)) as tmp:
        torch.save({**header, **state}, tmp)


def weights_id(path: Path) -> str:
    """The identity of a weights file's content: a digest of its records' names and CRC32s (from the zip's
    directory, nothing else is read). Records are named after the file torch wrote to, a temporary name; the
    part after it is what identifies them."""
    with zipfile.ZipFile(path) as archive:
        records = sorted((i.filename.split("/", 1)[-1], i.CRC, i.file_size) for i in archive.infolist())
    return hashlib.sha256(repr(records).encode()).hexdigest()


def read_train_state(weights: str | Path) -> dict[str, Any]:
    """What `train --resume` continues from: the state file beside `weights`, once sure it was saved with these
    very weights; or, in a single-file checkpoint of an earlier version, the state inside it."""
    weights = existing(weights)
    path = train_state_path(weights)
    if not path.is_file():
        legacy = read_checkpoint(weights).get("training_state")
        if legacy:
            return legacy
        raise UserError(f"{path}: not found: nothing to resume {weights.name} from (train writes it beside the "
                        "weights; train without --resume)")
    check_intact(weights)
    state = _load(path, mmap=False)
    if not isinstance(state, dict) or state.get("kind") != TRAIN_STATE_KIND:
        raise UserError(f"{path}: not a training state file of this tool")
    if state.get("format_version") != TRAIN_STATE_FORMAT:
        raise UserError(f"{path}: training state format {state.get('format_version')} is not supported "
                        f"(this version reads {TRAIN_STATE_FORMAT})")
    if state.get("weights") != weights_id(weights):
        raise UserError(f"{path}: training state of other weights than {weights} (a run stopped between writing "
                        "the two files, or they come from different runs); train without --resume")
    return state


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint payload, validated; every failure is one UserError line naming the file."""
    path = existing(path)
    # mmap: the tensors are mapped from the file (in the page cache after the CRC check), not copied.
    return checked(_load(path, mmap=True), path)


def _load(path: Path, mmap: bool) -> Any:
    """torch.load with weights_only=True of a file whose CRC32s are intact; failures are one line."""
    import torch

    check_intact(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated zip, a pickle that would run code, not a torch file
        reason = first_line(exc).split(". ")[0]
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = REFUSED
        raise UserError(f"{path}: not a readable checkpoint: {reason}") from None


def existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (train one with `python -m pipeline train`, or give a path)")
    return path


def check_intact(path: Path) -> None:
    """Refuse a file damaged after it was written, by the CRC32 of every zip member, which torch.save writes.

    torch.load checks none of them, so a few flipped bytes in a tensor would load as different weights and
    silently change every detection. Reading and summing the whole file costs ~0.07 s for a 190 MB Swin-T
    checkpoint in the page cache (zlib's CRC32 runs at ~3 GB/s), less than loading it; no digest of our own
    is needed, and checkpoints written before this check are covered too.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise UserError(f"{path}: not a readable checkpoint: {first_line(exc)}") from None
    if damaged is not None:
        raise UserError(f"{path}: damaged checkpoint: record {damaged.split('/', 1)[-1]} fails its CRC32 check "
                        "(the file changed after it was written; copy it again from its source)")


def _no_tensor(*_args: Any, **_kwargs: Any) -> None:
    return None


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles a torch checkpoint's plain data with every tensor, storage and dtype left as None.

    Like `weights_only=True`, it runs no code from the file: torch's globals become a function of ours that
    returns None (torch is never imported), and any other global but OrderedDict is refused.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" or module.startswith("torch."):
            return _no_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"Unsupported global {module}.{name}")

    def persistent_load(self, pid: Any) -> None:  # storages live in other zip members; not read
        return None


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    """The checkpoint's format version, config and class names, validated like `read_checkpoint`, without
    torch and without unpickling a single weight; the weights' CRC32s are checked (`check_intact`), so a `run`
    driver refuses a damaged checkpoint before it starts any worker."""
    path = existing(path)
    check_intact(path)
    try:
        with zipfile.ZipFile(path) as archive:
            records = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(records) != 1:
                raise ValueError("no torch data record")
            with archive.open(records[0]) as stream:
                payload = _HeaderUnpickler(stream).load()
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise UserError(f"{path}: not a readable checkpoint: {REFUSED}") from None
        raise UserError(f"{path}: not a readable checkpoint: {exc}") from None
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as exc:
        raise UserError(f"{path}: not a readable checkpoint: {exc or type(exc).__name__}") from None
    payload = checked(payload, path)
    return {key: payload[key] for key in ("format_version", "config", "class_names")}


def checked(payload: Any, path: str | Path) -> dict[str, Any]:
    """`payload` if it is a checkpoint of this tool in the format this version reads."""
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise UserError(f"{path}: not a checkpoint of this tool (no format_version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {payload['format_version']} is not supported "
                        f"(this version reads {FORMAT_VERSION})")
    for key in ("config", "class_names", "model"):
        if key not in payload:
            raise UserError(f"{path}: checkpoint lacks '{key}'")
    return payload


def check_compatible(payload: dict[str, Any], config: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose architecture or classes differ from `config`, naming the mismatch."""
    saved = payload["config"]["model"]
    wanted = config["model"]
    for key in ("name",):
        if saved["backbone"][key] != wanted["backbone"][key]:
            raise UserError(f"{path}: checkpoint backbone is {saved['backbone'][key]} but the config asks for "
                            f"{wanted['backbone'][key]}")
    for key in ("fpn_channels", "anchor_sizes", "aspect_ratios"):
        if saved[key] != wanted[key]:
            raise UserError(f"{path}: checkpoint model.{key} = {saved[key]} but the config has {wanted[key]}")
    if config["classes"] is not None and list(config["classes"]) != list(payload["class_names"]):
        raise UserError(f"{path}: checkpoint classes {payload['class_names']} differ from the config's "
                        f"{config['classes']}")


def load_checkpoint(path: str | Path, config: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint. With `config`, first check the checkpoint matches it.

    Returns (model in eval mode on the CPU, payload).
    """
    from model.builder import build_model

    payload = read_checkpoint(path)
    try:  # only what builds the network: a checkpoint must not be refused for its training settings
        saved_config = merge(DEFAULTS, payload["config"])
        validate_model(saved_config)
    except UserError as exc:
        raise UserError(f"{path}: checkpoint config: {exc}") from None
    if config is not None:
        check_compatible(payload, config, path)
    # Never reload ImageNet weights: the checkpoint already holds trained ones.
    model = build_model(saved_config, num_classes=len(payload["class_names"]), load_weights=False)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise UserError(f"{path}: weights do not fit the model the checkpoint describes ({detail[:300]})") from None
    model.eval()
    return model, payload

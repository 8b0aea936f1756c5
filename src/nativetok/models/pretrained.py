"""The Hugging Face Hub's model interface on the tokenizer and generator classes: `from_pretrained`,
`save_pretrained` and `push_to_hub`, as `PyTorchModelHubMixin` gives TiTok's models.

The folder they read and write is a NativeTok export (config.json with the experiment config, model.safetensors
and its sha256, a generator's tokenizer bundled in tokenizer/), read under the same checks as every loader's.
Reading exports belongs to `nativetok.checkpoints` and writing them (model card, upload) to
`nativetok.pipelines.export`, layers above these classes; they hand their functions in through `connect`, which
`nativetok/__init__.py` calls, and importing any `nativetok` module runs that first. So the classes carry the
interface without an import back up the layers.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from nativetok.config.schema import ExperimentConfig


@dataclass(frozen=True)
class ExportFunctions:
    """What the upper layers provide: `load(kind, path, revision=, device=, ema=)` -> model,
    `save(model, folder, **options)` -> folder, `push(folder, repo_id, **options)` -> the Hub's commit."""

    load: Callable[..., Any]
    save: Callable[..., Path]
    push: Callable[..., Any]


_functions: Optional[ExportFunctions] = None


def connect(functions: ExportFunctions) -> None:
    global _functions
    _functions = functions


def _connected() -> ExportFunctions:
    if _functions is None:
        raise RuntimeError("nativetok's export functions are not connected: import nativetok first")
    return _functions


class Pretrained:
    """A model shared as a NativeTok export. Loaded models remember the experiment config they were built with
    (`experiment_config`) and where they were read from (`loaded_from`), which `save_pretrained` writes back."""

    pretrained_kind: ClassVar[str]  # "tokenizer" or "generator": the kind an export's config.json names
    experiment_config: Optional[ExperimentConfig] = None
    loaded_from: Optional[Path] = None

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, revision: Optional[str] = None,
                        device: Any = "cpu", ema: bool = True):
        """A trained model in eval mode from a checkpoint, an export folder or a Hub repo id at `revision` (a
        branch, tag or commit), refused unless it is one of this class."""
        model = _connected().load(cls.pretrained_kind, path_or_repo_id, revision=revision, device=device, ema=ema)
        if not isinstance(model, cls):
            raise TypeError(f"{path_or_repo_id} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def save_pretrained(self, folder: str | os.PathLike, *, config: Optional[ExperimentConfig] = None,
                        tokenizer: Any = None, force: bool = False, license: Optional[str] = None) -> Path:
        """Write this model's current weights as an export into `folder` (new or empty; with `force`, an earlier
        export) and return it. `config` is the experiment config the model was built with (default: the one it
        was loaded with). A generator bundles `tokenizer` (a tokenizer model, checkpoint or export; default: the
        one it was pinned to when loaded). The folder is loaded back as the loaders load it before it is moved
        into place."""
        return _connected().save(self, folder, config=config, tokenizer=tokenizer, force=force, license=license)

    def push_to_hub(self, repo_id: str, *, revision: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, commit_message: Optional[str] = None,
                    config: Optional[ExperimentConfig] = None, tokenizer: Any = None,
                    license: Optional[str] = None):
        """`save_pretrained` into a scratch folder, then one commit of it to Hub model repo `repo_id` on branch
        `revision` (created when new); returns the commit (`.oid` pins this version)."""
        with tempfile.TemporaryDirectory(prefix="nativetok-push-") as scratch:
            folder = self.save_pretrained(Path(scratch) / "export", config=config, tokenizer=tokenizer,
                                          license=license)
            return _connected().push(folder, repo_id, revision=revision, token=token, private=private,
                                     commit_message=commit_message)

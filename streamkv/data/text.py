"""The ``data`` group's sources: the embedded Python reference, wikitext-2, or any text file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from ..kv.errors import ConfigError
from ..registry import register


def _local_text(path: str, key: str) -> str:
    """A local text file as one document, read through ``datasets``' text builder."""
    import datasets

    datasets.disable_progress_bars()  # a one-file load: its bars are noise
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}={path} does not exist (or is not a file)")
    ds = datasets.load_dataset("text", data_files=str(p), sample_by="document", split="train")
    return _joined(ds, key)


def _joined(ds, key: str) -> str:
    text = "\n\n".join(ds["text"])
    if not text.strip():
        raise ConfigError(f"{key}: the text is empty")
    return text


@register("data", "pydoc")
@dataclass
class PydocText:
    """The Python language reference (``pydoc_data.topics``, ~130k tokens), present in every CPython."""

    name: str = "pydoc"

    def load(self) -> str:
        import datasets
        from pydoc_data.topics import topics

        ds = datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
        return _joined(ds, "data=pydoc")


@register("data", "wikitext2")
@dataclass
class WikiText2:
    """wikitext-2-raw-v1, test split, lines joined with blank lines as GPTQ/KVQuant evaluate it.

    With ``path`` a local copy of that joined text is read instead of the hub.
    """

    name: str = "wikitext2"
    path: Optional[str] = None
    hub_name: str = "wikitext"
    hub_config: str = "wikitext-2-raw-v1"
    split: str = "test"

    def load(self) -> str:
        if self.path:
            return _local_text(self.path, "data.path")
        import datasets

        try:
            ds = datasets.load_dataset(self.hub_name, self.hub_config, split=self.split)
        except Exception as e:  # noqa: BLE001 - offline hub failures come in many types
            raise ConfigError(
                f"cannot load {self.hub_name}/{self.hub_config} from the hub ({type(e).__name__}); "
                "pass a local copy with data.path=../shared/data/wikitext-2-raw/test.txt"
            ) from None
        return _joined(ds, "data=wikitext2")


@register("data", "text_file")
@dataclass
class TextFile:
    """Any local text file, read as one document."""

    name: str = "text_file"
    path: str = MISSING

    def load(self) -> str:
        return _local_text(self.path, "data.path")

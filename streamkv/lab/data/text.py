"""The ``data`` group's sources: the embedded Python reference, wikitext-2, or any text file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from ...kv.errors import ConfigError, check
from ..registry import register
from ..runs import network

SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file (as git and grep decide)


def _local_text(path: str, key: str) -> str:
    """A local text file as one document: UTF-8, newlines normalized to ``\n`` (as ``datasets``' text
    builder read it, so measurements compare), read directly, so no download machinery or network."""
    p = Path(path).expanduser()
    check(p.is_file(), f"{key}={path} does not exist (or is not a file)")
    try:
        with open(p, "rb") as f:
            check(b"\0" not in f.read(SNIFF_BYTES), f"{key}={path} is a binary file, not text")
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{key}={path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{key}={path} cannot be read: {e.strerror}") from None
    return _nonempty(text, f"{key}={path}")


def _nonempty(text: str, source: str) -> str:
    check(bool(text.strip()), f"{source}: the text is empty")
    return text


@register("data", "pydoc")
@dataclass
class PydocText:
    """The Python language reference (``pydoc_data.topics``, ~130k tokens), present in every CPython."""

    name: str = "pydoc"

    def load(self) -> str:
        from pydoc_data.topics import topics

        return _nonempty("\n\n".join(topics[k] for k in sorted(topics)), "data=pydoc")


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

        network.use_hub(datasets=True)
        try:
            ds = datasets.load_dataset(self.hub_name, self.hub_config, split=self.split)
        except Exception as e:  # noqa: BLE001 - offline hub failures come in many types
            offline = network.hub_offline(datasets=True)
            raise ConfigError(
                f"cannot load {self.hub_name}/{self.hub_config} from the hub "
                f"({f'offline: {offline}' if offline else type(e).__name__}); "
                "pass a local copy of its test split with data.path=... (or STREAMKV_WIKITEXT=...)"
            ) from None
        return _nonempty("\n\n".join(ds["text"]), "data=wikitext2")


@register("data", "text_file")
@dataclass
class TextFile:
    """Any local text file, read as one document."""

    name: str = "text_file"
    path: str = MISSING

    def load(self) -> str:
        return _local_text(self.path, "data.path")

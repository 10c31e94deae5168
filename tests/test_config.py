"""Every option of every config group composes and builds; wrong keys and types fail at composition."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import streamkv.lab.schema  # noqa: F401
from streamkv.lab import registry
from streamkv.lab.compression import build_compression

CONF = Path(__file__).resolve().parent.parent / "conf"
registry.load_builtins()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_eval(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


CASES = [(g, o) for g in registry.GROUPS for o in options(g)] + [("experiment", o) for o in options("experiment")]


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_option_composes_and_builds(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "text_file"):
        overrides.append(f"data.path={tmp_path / 'x.txt'}")
    cfg = compose_eval(overrides)
    for g in registry.GROUPS:
        if group == "experiment" and g not in ("quantizer", "sink", "outlier"):
            continue
        component = registry.create(g, cfg[g])
        assert type(component).registered_name in registry.names(g)
    build_compression(cfg.quantizer, cfg.sink, cfg.outlier)


def test_every_registered_component_has_a_yaml_option():
    for group in ("quantizer", "sink", "outlier", "logger", "task"):
        schemas = {OmegaConf.get_type(compose_eval([f"{group}={o}"])[group]) for o in options(group)}
        assert {registry.get(group, n) for n in registry.names(group)} <= schemas, group


def test_default_is_the_seed_preset():
    base, seed = compose_eval(), compose_eval(["experiment=seed"])
    for g in ("quantizer", "sink", "outlier", "chunk_size"):
        assert base[g] == seed[g]
    assert (base.quantizer.key_bits, base.sink.size, base.outlier.threshold, base.outlier.ema_decay) == (4, 4, 3.0, 0.9)


@pytest.mark.parametrize(
    "override",
    ["quantizer.nope=1", "nope=1", "chunk_size=abc", "quantizer.key_bits=four", "model=nope", "sink.size=1.5"],
)
def test_wrong_keys_and_types_fail_at_composition(override):
    with pytest.raises((ConfigCompositionException, Exception)) as e:
        compose_eval([override])
    assert "nope" in str(e.value) or "abc" in str(e.value) or "four" in str(e.value) or "1.5" in str(e.value)


def test_a_new_quantizer_is_one_module_and_one_yaml(tmp_path, monkeypatch, tiny_llama):
    """A user's quantizer, outside the package: no core file is edited."""
    (tmp_path / "toy_quant.py").write_text(
        "from dataclasses import dataclass\n"
        "from streamkv import register\n"
        "from streamkv.kv.quantizers.uniform import UniformQuantizer\n"
        "@register('quantizer', 'toy')\n"
        "@dataclass\n"
        "class ToyQuantizer(UniformQuantizer):\n"
        "    '''Uniform, but always 8-bit keys.'''\n"
        "    def encode_keys(self, x, exclude=None, *, layer=0):\n"
        "        from streamkv.kv.storage.packed import quantize\n"
        "        return quantize(x, 8, self.key_axis, self.key_group_size, exclude)\n"
    )
    conf = tmp_path / "conf" / "quantizer"
    conf.mkdir(parents=True)
    (conf / "toy.yaml").write_text("defaults:\n  - /schema/quantizer/toy@_here_\n  - _self_\nkey_bits: 2\nkey_group_size: 16\nvalue_group_size: 16\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_quant  # noqa: F401  (registers itself)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["quantizer=toy", f"hydra.searchpath=[file://{tmp_path / 'conf'}]"])
    comp = build_compression(cfg.quantizer, "none", "none")
    assert type(comp.quantizer).__name__ == "ToyQuantizer"
    import torch

    from streamkv import CompressedCache

    cache = CompressedCache.for_model(tiny_llama, comp, chunk_size=16)
    with torch.inference_mode():
        tiny_llama(input_ids=torch.randint(0, 96, (1, 32)), cache=cache, use_cache=True)
    assert cache.stats()["avg_key_bits"] == pytest.approx(8 + 32 / 16)

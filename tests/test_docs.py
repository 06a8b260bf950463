"""The README documents every config key, and shows both commands."""
import os

from maskx_jax.config import base_config

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _keys(cfg, prefix=""):
    for k, v in cfg.items():
        if hasattr(v, "items"):
            yield from _keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_every_config_key_is_documented():
    text = open(README).read()
    missing = [k for k in _keys(base_config()) if f"`{k}`" not in text]
    assert not missing, f"config keys missing from the README's reference: {missing}"


def test_readme_shows_the_two_commands():
    text = open(README).read()
    assert "make demo" in text and "make test" in text

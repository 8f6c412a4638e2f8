"""Settings come from CDS_* variables, fail clearly, and are all documented in docs/settings.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from cds_service.settings import Settings, SettingsError, setting_defaults, settings_table_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_environment_variables_override_defaults() -> None:
    settings = Settings.from_env(
        {"CDS_PORT": "9999", "CDS_FHIR_READ_TIMEOUT": "1.5", "CDS_HOST": "0.0.0.0"}
    )
    assert (settings.port, settings.fhir_read_timeout, settings.host) == (9999, 1.5, "0.0.0.0")
    assert Settings.from_env({}, port=1234).port == 1234


def test_invalid_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="CDS_WORKERS"):
        Settings.from_env({"CDS_WORKERS": "many"})


def test_docs_list_every_setting_with_its_default() -> None:
    readme = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert settings_table_markdown() in readme, (
        "docs/settings.md's table is stale: paste the output of "
        "`python -c 'from cds_service.settings import settings_table_markdown as t; print(t())'`"
    )
    for name in setting_defaults():
        assert f"`CDS_{name.upper()}`" in readme

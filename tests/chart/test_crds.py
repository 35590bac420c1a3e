"""The chart's CRDs are the generated ones, byte for byte: the templates render
`files/crds/` verbatim, and `make crds` writes that copy with `crds/` (the generator itself
puts the `helm.sh/resource-policy: keep` annotation in, so nothing is added on the way)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from leyline import crd
from tests.chart.rendering import ROOT, of_kind, render, render_files

TEMPLATES = {
    crd.RUN_FILE: "tolaria/templates/crds/tolariaruns.yaml",
    crd.INCIDENT_FILE: "tolaria/templates/crds/tolariaincidents.yaml",
}


@pytest.mark.parametrize("name", sorted(crd.crds()))
def test_the_rendered_crd_is_the_committed_file_byte_for_byte(name: str) -> None:
    committed = (ROOT / "crds" / name).read_bytes()
    assert render_files()[TEMPLATES[name]].encode("utf-8") == committed


@pytest.mark.parametrize("name", sorted(crd.crds()))
def test_the_rendered_crd_is_a_fresh_generation(name: str) -> None:
    assert render_files()[TEMPLATES[name]] == crd.rendered()[name]


def test_every_generated_crd_has_a_template() -> None:
    assert sorted(TEMPLATES) == sorted(crd.crds())
    templates = {p.name for p in (ROOT / "charts/tolaria/templates/crds").glob("*.yaml")}
    assert templates == {Path(t).name for t in TEMPLATES.values()}


def test_the_rendered_crds_tell_helm_to_keep_them() -> None:
    for obj in of_kind(render(), "CustomResourceDefinition"):
        assert obj["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_crds_install_false_renders_no_crd() -> None:
    assert of_kind(render({"crds": {"install": False}}), "CustomResourceDefinition") == []
    for template in TEMPLATES.values():
        assert render_files({"crds": {"install": False}})[template].strip() == ""


def test_the_crds_live_in_templates_so_helm_upgrade_updates_them() -> None:
    """Helm installs a chart's crds/ directory once and never upgrades it."""
    assert not (ROOT / "charts/tolaria/crds").exists()
    assert [yaml.safe_load(render_files()[t])["kind"] for t in TEMPLATES.values()] == [
        "CustomResourceDefinition"
    ] * 2

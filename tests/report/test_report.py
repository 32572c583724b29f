"""The HTML report: produced from a real run, self-contained, every section present."""

from __future__ import annotations

import re

from pneumoscope.evaluate.run import evaluate_model
from pneumoscope.report.html import SECTIONS, build_report


def test_report_has_every_section_and_inlines_images(tmp_path, data_root, smoke_run):
    evaluate_model(smoke_run, data_root, split="test", bootstrap=100, tta=0, cache_root=tmp_path / "cache",
                   progress=False)
    out = build_report(smoke_run, tmp_path / "report.html", galleries=True)
    html = out.read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in html, section
    assert "not a diagnostic device" in html
    imgs = re.findall(r'src="([^"]+)"', html)
    assert len(imgs) >= 6 and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched
    # the Grad-CAM attention table has numbers for all images (lung share, border share)
    assert re.search(r"<td>all</td><td>all</td><td>\d+</td><td>[01]\.\d{4}</td><td>[01]\.\d{4}</td>", html)
    assert "95 % CI" in html and "(" in html and "/624)" in html  # percentages come with counts


def test_operating_point_says_threshold_for_binary_and_argmax_for_three_classes():
    from pneumoscope.report.html import operating_point_html

    binary = {"threshold": {"value": 0.61, "rule_description": "max Youden's J on validation",
                            "achieved": {"sensitivity": 0.95, "specificity": 0.9}},
              "split": "test", "temperature": 1.2, "class_names": ["NORMAL", "PNEUMONIA"]}
    text = operating_point_html(binary)
    assert "Decision threshold <b>0.6100</b>" in text and "sensitivity 0.950" in text
    three = {**binary, "threshold": {"value": 0.5, "rule_description": "argmax"},
             "class_names": ["normal", "bacterial", "viral"]}
    text = operating_point_html(three)
    assert "argmax" in text and "Decision threshold" not in text and "3 classes" in text


def test_dataset_section_renders_the_data_check_as_html_tables(small_kermany, tmp_path):
    """The data check's Markdown becomes headings and tables (not a <pre> dump); file names stay escaped."""
    import shutil

    from pneumoscope.data.check import run_check
    from pneumoscope.data.scan import scan_dataset
    from pneumoscope.data.split import patient_split
    from pneumoscope.report.html import dataset_html

    normal = small_kermany / "train" / "NORMAL"
    first = sorted(normal.iterdir())[0]
    shutil.copy(first, normal / "a<i>b&c.jpeg")  # a duplicate whose name looks like HTML
    manifest = patient_split(scan_dataset(small_kermany, progress=False), seed=0)
    run_check(manifest, tmp_path / "check", sample_per_class=2)
    section = dataset_html(tmp_path / "check")
    assert "<pre>" not in section and "<h1>" not in section
    assert "<h3>Counts (split used for training)</h3>" in section
    assert re.search(r"<table>\s*<thead>\s*<tr>\s*<th>split</th>\s*<th>class</th>", section)
    assert "<td>train</td>" in section and "<strong>all</strong>" in section
    assert "a&lt;i&gt;b&amp;c.jpeg" in section and "<i>" not in section
    assert section.count("data:image/png;base64,") == 3


def test_model_card_says_how_the_validation_set_was_made() -> None:
    from pneumoscope.report.html import validation_description

    assert "external" in validation_description({"val_split": {"method": "external", "val_source": "/data/<b>"}})
    assert "&lt;b&gt;" in validation_description({"val_split": {"method": "external", "val_source": "/data/<b>"}})
    assert "temporal" in validation_description({"val_split": {"method": "ordered", "val_fraction": 0.15}})
    plain = validation_description({"val_split": {"method": "random", "val_fraction": 0.15}})
    assert "by patient" in plain and "temporal" not in plain and plain == validation_description({})

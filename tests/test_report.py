"""The HTML run report: written at the end of training, self-contained, with every section filled."""

from __future__ import annotations

import base64
import html.parser
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from helpers import copy_run_with_config
from imgclf_jax import evaluate, report


class _PageParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.sections, self.figures, self.links = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "figure":
            self.figures += 1
        for key in ("href", "src"):
            if key in attrs:
                self.links.append(attrs[key])


def test_training_writes_a_self_contained_report(trained_run):
    workdir, _ = trained_run
    page = (workdir / report.REPORT_FILE).read_text()  # Written by train_and_evaluate itself.
    parser = _PageParser()
    parser.feed(page)
    parser.close()
    assert parser.sections == ["summary", "curves", "classes", "calibration", "gallery", "config"]
    # Curves, confusion matrix, reliability diagram, then one thumbnail per validation image (13 < 24).
    assert len(parser.images) == 3 + 13 and parser.figures == 13
    assert all(link.startswith("data:image/png;base64,") for link in parser.links)  # Nothing external.
    for src in parser.images:
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and min(image.size) >= 100
    scores = evaluate.evaluate(str(workdir), split="validation")
    assert f"{scores['calibration']['expected_calibration_error']:.4f}" in page
    assert f"{scores['accuracy']:.4f}" in page
    assert "validation/cats/img_10" in page  # Gallery captions name the files.
    assert "&quot;batch_size&quot;: 8" in page  # The config, escaped.


def test_the_report_written_in_training_equals_one_rebuilt_from_the_best_checkpoint(trained_run, tmp_path):
    # The trainer hands the report the scores it collected while validating the best epoch; restoring that
    # checkpoint and scoring the photos again must give the same page (but for the time it was generated).
    workdir, _ = trained_run
    copy = tmp_path / "work"
    shutil.copytree(workdir, copy)
    (copy / report.REPORT_FILE).unlink()
    rebuilt = open(report.build_report(str(copy))).read()

    def comparable(page):
        page = re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d", "", page)
        return re.sub(r'src="data:image/png;base64,[^"]*"', "", page).replace(str(copy), str(workdir))

    assert comparable(rebuilt) == comparable((workdir / report.REPORT_FILE).read_text())


def test_a_run_with_test_time_augmentation_is_reported_as_training_validated(trained_run, tmp_path):
    # The report shows the accuracy training logged (each photo alone) and says that evaluate and predict
    # average more views; it must not silently switch to the augmented score.
    workdir, _ = trained_run
    copy = copy_run_with_config(workdir, tmp_path / "work", tta="flip")
    page = open(report.build_report(str(copy))).read()
    plain = evaluate.evaluate(str(workdir), split="validation", tta="none")
    flipped = evaluate.evaluate(str(copy), split="validation")
    assert flipped["tta"] == "flip" and f"{flipped['loss']:.4f}" != f"{plain['loss']:.4f}"
    assert f"{plain['loss']:.4f}" in page and f"{flipped['loss']:.4f}" not in page
    assert "evaluate and predict average the flip test-time augmentation" in page
    assert "test-time augmentation" not in (workdir / report.REPORT_FILE).read_text()


def test_hardest_images_keeps_the_highest_losses_worst_first():
    hardest = report.HardestImages(2)
    images = np.zeros((3, 4, 4, 3), np.float32)
    hardest.add(images, np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 0, 0]))
    hardest.add(images[:1], np.array([[0.05, 0.95]]), np.array([0]))
    kept = hardest.worst_first()
    assert [k["index"] for k in kept] == [3, 1]
    assert kept[0]["loss"] == pytest.approx(-np.log(0.05)) and kept[0]["image"].dtype == np.uint8


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_the_report_renders_in_headless_chromium(trained_run, tmp_path):
    workdir, _ = trained_run
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000",
                    f"--screenshot={shot}", (workdir / report.REPORT_FILE).as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 20  # A page with figures, not a blank or error screen.

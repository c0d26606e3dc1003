"""Run report: one self-contained HTML page about a trained run, written at the end of training.

    python -m imgclf_jax.report WORKDIR [--checkpoint kept|best|latest|STEP] [--gallery 24]

`WORKDIR/report.html` holds the config, the training curves, the scores and per-class metrics of the
checkpoint on the run's validation data, the confusion matrix, calibration (reliability diagram and
expected calibration error), and a gallery of the validation images with the highest loss (as the model saw
them, with the true and predicted class and the probabilities). Every image is embedded (base64 PNG), so
the file can be mailed or archived on its own.
"""

from __future__ import annotations

if __name__ == "__main__":  # Before TensorFlow loads, so that its C++ start-up lines stay quiet.
    import sys

    from imgclf_jax import cli

    cli.prepare_environment(sys.argv)

import base64
import dataclasses
import datetime
import heapq
import html
import io
import json
import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from imgclf_jax import cli, config_lib, evaluate, folders, inference, plotting
from imgclf_jax.errors import UserError
from imgclf_jax.metrics import classification_report, read_metrics

REPORT_FILE = "report.html"
GALLERY_SIZE = 24
_THUMB_SIZE = 128


class HardestImages:
    """Keeps the `k` examples with the highest loss (-log p(true class)) seen so far, with their images."""

    def __init__(self, k: int):
        self.k = k
        self._heap: list[tuple[float, int, np.ndarray, np.ndarray, int]] = []
        self._seen = 0

    def add(self, images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray) -> None:
        losses = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0))
        for i, loss in enumerate(losses.tolist()):
            # A copy, so a kept image does not keep its whole batch alive.
            item = (loss, self._seen + i, np.array(images[i]), probabilities[i], int(labels[i]))
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, item)
            elif loss > self._heap[0][0]:
                heapq.heapreplace(self._heap, item)
        self._seen += len(labels)

    def worst_first(self) -> list[dict[str, Any]]:
        """[{index, loss, image (uint8), probabilities, label}], highest loss first."""
        return [{"index": index, "loss": loss, "image": np.round(image * 255).astype(np.uint8),
                 "probabilities": probs, "label": label}
                for loss, index, image, probs, label in sorted(self._heap, key=lambda t: (-t[0], t[1]))]


def _png_data_uri(draw) -> str:
    buffer = io.BytesIO()
    draw(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail_uri(image: np.ndarray) -> str:
    thumb = Image.fromarray(image)
    if max(thumb.size) != _THUMB_SIZE:
        thumb = thumb.resize((_THUMB_SIZE, _THUMB_SIZE), Image.Resampling.LANCZOS)
    return _png_data_uri(lambda buffer: thumb.save(buffer, format="PNG"))


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; background: #f4f5f7;
       color: #1d2330; }
header { background: #1d2330; color: white; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; } header p { margin: 0; color: #c4c9d4; font-size: 14px; }
main { padding: 16px 32px 40px 32px; max-width: 1280px; }
section { background: white; border-radius: 8px; padding: 16px 20px; margin: 16px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); }
h2 { font-size: 17px; margin: 0 0 12px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #eef1f6; border-radius: 6px; padding: 10px 16px; min-width: 120px; }
.card b { display: block; font-size: 22px; } .card span { font-size: 12px; color: #5a6272; }
.figures { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
img.figure { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 12px; text-align: right; border-bottom: 1px solid #e3e6eb; }
th:first-child, td:first-child { text-align: left; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
figure { margin: 0; background: #fafbfc; border: 1px solid #e3e6eb; border-radius: 6px; padding: 8px;
         font-size: 12px; }
figure img { width: 128px; height: 128px; display: block; margin: 0 auto 6px auto; image-rendering: auto; }
figcaption .wrong { color: #b3261e; font-weight: 600; } figcaption .path { color: #5a6272; word-break: break-all; }
pre { background: #f6f8fa; padding: 12px; border-radius: 6px; font-size: 12px; overflow-x: auto; max-height: 420px; }
.note { color: #5a6272; font-size: 13px; }
"""


def _cards(items: Sequence[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>' for k, v in items
    ) + "</div>"


def _per_class_table(report: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
        f"<td>{m['f1']:.3f}</td><td>{m['support']}</td></tr>"
        for c, m in report["per_class"].items()
    )
    return ("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
            f"{rows}</table>")


def _gallery(hardest: list[dict[str, Any]], class_names: Sequence[str], paths: Optional[Sequence[str]],
             root: Optional[str]) -> str:
    figures = []
    for item in hardest:
        probs = item["probabilities"]
        predicted = int(np.argmax(probs))
        true_name, predicted_name = class_names[item["label"]], class_names[predicted]
        verdict = "wrong" if predicted != item["label"] else "right"
        where = ""
        if paths is not None:
            path = paths[item["index"]]
            shown = folders.display_path(os.path.relpath(path, root) if root else path)
            where = f'<br><span class="path">{html.escape(shown)}</span>'
        figures.append(
            f'<figure><img src="{_thumbnail_uri(item["image"])}" alt="{html.escape(true_name)}">'
            f"<figcaption>true <b>{html.escape(true_name)}</b> ({probs[item['label']]:.2f})<br>"
            f'predicted <span class="{verdict}">{html.escape(predicted_name)}</span> ({probs[predicted]:.2f})<br>'
            f"loss {item['loss']:.3f}{where}</figcaption></figure>")
    return '<div class="gallery">' + "".join(figures) + "</div>"


@dataclasses.dataclass
class ValidationScores:
    """A checkpoint's scores on its run's validation data: what the report shows besides the training curves.

    The trainer fills one in as it validates (so the report at the end of training needs no second pass
    over the photos); `score_checkpoint` computes one from a work directory.
    """

    config: Any
    class_names: list[str]
    step: int
    epoch: int
    probabilities: np.ndarray  # (N, classes)
    labels: np.ndarray  # (N,)
    hardest: HardestImages
    paths: Optional[Sequence[str]]
    description: str
    split: str = "validation"  # 'test' for a run that trained on every photo, without validation.


class ValidationScorer:
    """Builds `ValidationScores` batch by batch: `add` is the `on_batch` of an evaluation loop."""

    def __init__(self, gallery_size: int):
        self.hardest = HardestImages(gallery_size)
        self._probabilities: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def add(self, images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray) -> None:
        self.hardest.add(images, probabilities, labels)
        self._probabilities.append(probabilities)
        self._labels.append(labels)

    def scores(self, config: Any, class_names: list[str], step: int, epoch: int,
               paths: Optional[Sequence[str]], description: str) -> ValidationScores:
        return ValidationScores(config, class_names, step, epoch, np.concatenate(self._probabilities),
                                np.concatenate(self._labels), self.hardest, paths, description)


def score_checkpoint(workdir: str, checkpoint: str = "kept", gallery_size: int = GALLERY_SIZE,
                     batch_size: int = 64) -> ValidationScores:
    """Restores `checkpoint` of the run in `workdir` and scores it on the run's validation data, or on its test
    photos where it trained on every other photo, without validation."""
    run = inference.load_run(workdir, checkpoint)
    data, split, description, _ = evaluate.resolve_eval_data(run, None, None, None, order=("validation", "test"))
    scorer = ValidationScorer(gallery_size)
    evaluate.predict_split(run, data, batch_size, tta="none", on_batch=scorer.add)  # As training validates.
    scores = scorer.scores(run.config, run.class_names, run.step, run.epoch, data.paths, description)
    return dataclasses.replace(scores, split=split)


def build_report(workdir: str, checkpoint: str = "kept", gallery_size: int = GALLERY_SIZE, batch_size: int = 64,
                 scores: Optional[ValidationScores] = None) -> str:
    """Writes WORKDIR/report.html about `checkpoint` and returns its path; `scores` are that checkpoint's
    validation scores where the caller has them (else they are computed here)."""
    config_lib.require_positive_int("gallery", gallery_size)
    if scores is None:
        scores = score_checkpoint(workdir, checkpoint, gallery_size, batch_size)
    report = classification_report(scores.probabilities, scores.labels, scores.class_names)
    records = read_metrics(workdir)
    calibration = report["calibration"]
    config, class_names, hardest = scores.config, scores.class_names, scores.hardest
    name = config.get("name", os.path.basename(os.path.abspath(workdir)))
    restored = inference.checkpoint_to_restore(config, checkpoint)  # 'kept' named as what it is.

    headline = [("accuracy", f"{report['accuracy']:.4f}"), ("loss", f"{report['loss']:.4f}"),
                ("macro F1", f"{report['macro_f1']:.4f}"),
                ("ECE", f"{calibration['expected_calibration_error']:.4f}"),
                (f"{scores.split} images", f"{report['num_examples']:,}")]
    if "roc_auc" in report:
        headline.insert(3, ("ROC-AUC", f"{report['roc_auc']:.4f}"))
    if "top5_accuracy" in report:
        headline.insert(3, ("top-5 accuracy", f"{report['top5_accuracy']:.4f}"))
    if records:
        total_s = sum(r.get("epoch_time_s", 0.0) for r in records)
        headline.append(("training time", f"{total_s / 60:.1f} min"))

    curves = (f'<img class="figure" alt="training curves" src="'
              f'{_png_data_uri(lambda b: plotting.plot_training_curves({name: records}, b))}">'
              if records else '<p class="note">No metrics.jsonl in this work directory.</p>')
    confusion = _png_data_uri(lambda b: plotting.plot_confusion_matrix(
        report["confusion_matrix"], class_names, b, "Confusion matrix (rows = true class)"))
    reliability = _png_data_uri(lambda b: plotting.plot_reliability(
        calibration["bins"], calibration["expected_calibration_error"], b))
    tta = config.get("tta", "none")
    tta_note = (f"<br>Scored as training validates, on each photo alone; evaluate and predict average the "
                f"{html.escape(tta)} test-time augmentation's views (config.tta)" if tta != "none" else "")
    config_json = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")

    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgclf_jax report: {html.escape(name)}</title>
<style>{_STYLE}</style>
</head>
<body>
<header>
<h1>{html.escape(name)}: {report['accuracy']:.1%} {scores.split} accuracy</h1>
<p>{html.escape(config.model)} on {html.escape(scores.description)}; checkpoint {html.escape(str(restored))}
(step {scores.step}, epoch {scores.epoch} of {len(records) or '?'} trained); {len(class_names)} classes;
generated {generated} by imgclf_jax.report{tta_note}</p>
</header>
<main>
<section id="summary"><h2>Summary</h2>{_cards(headline)}</section>
<section id="curves"><h2>Training curves</h2>{curves}</section>
<section id="classes"><h2>Per-class metrics and confusion matrix</h2>
<div class="figures"><div>{_per_class_table(report)}</div>
<img class="figure" alt="confusion matrix" src="{confusion}"></div></section>
<section id="calibration"><h2>Calibration</h2>
<div class="figures"><img class="figure" alt="reliability diagram" src="{reliability}">
<p class="note" style="max-width:420px">Each bar is the accuracy of the {scores.split} images whose top-class
probability falls in that bin; a calibrated model's bars follow the diagonal. The expected calibration error
(ECE) is the average gap, weighted by how many images each bin holds:
<b>{calibration['expected_calibration_error']:.4f}</b>.</p></div></section>
<section id="gallery"><h2>Highest-loss {scores.split} images ({len(hardest.worst_first())})</h2>
<p class="note">As the model saw them (resized to {config.image_size}&times;{config.image_size}), worst first:
label errors, ambiguous photos and the model's blind spots show up here.</p>
{_gallery(hardest.worst_first(), class_names, scores.paths, config.get("data_dir") or None)}</section>
<section id="config"><h2>Config</h2><pre>{html.escape(config_json)}</pre></section>
</main>
</body>
</html>
"""
    path = os.path.join(workdir, REPORT_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", "kept", inference.CHECKPOINT_HELP)
    flags.DEFINE_integer("gallery", GALLERY_SIZE, "How many highest-loss validation images to show.")
    flags.DEFINE_integer("batch_size", 64, "Evaluation batch size (does not change the results).")


def main(argv: Sequence[str]) -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) != 2:
        raise UserError("name one work directory: python -m imgclf_jax.report WORKDIR")
    config_lib.require_positive_int("batch_size", FLAGS.batch_size)
    print(f"Wrote {build_report(argv[1], FLAGS.checkpoint, FLAGS.gallery, FLAGS.batch_size)}")


def run() -> None:
    _define_flags()
    cli.run("imgclf_jax.report", main)


if __name__ == "__main__":
    run()

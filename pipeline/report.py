"""Report stage: one self-contained `report.html` per evaluation, readable offline.

It shows the metrics (the pipeline's and the model's own), the verdict on them (see
pipeline.blessing), the confusion matrix, per-class precision and recall, the loss and accuracy
curves read from the run's TensorBoard event files (training, validation during training, and this
evaluation), the model file and its code hash, the params, the data version, some misclassified
images with their labels, and the lineage of the verdict (see pipeline.lineage), back to the source. Images and the
charts (drawn with matplotlib) are inlined as data URIs, so the file can be mailed alone.
"""
from __future__ import annotations

import base64
import csv
import datetime
import hashlib
import html
import io
import json
from typing import Iterable, Mapping, Sequence

from pipeline.blessing import describe
from pipeline.csvcells import read_record
from pipeline.evaluation import CONFUSION_MATRIX_PNG
from pipeline import storage
from pipeline.storage import read_json, write_bytes
from pipeline.plots import curves_png
from pipeline.runfiles import MODEL_DIR, MODEL_FILE, VALIDATION

# Tags charted; a model that does not log one (accuracy, say) simply has no such chart.
CHARTED_TAGS = ("loss", "accuracy")
MISCLASSIFIED_SHOWN = 12

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; }
.card b { display: block; font-size: 1.4em; }
.charts { display: flex; gap: 1.5em; flex-wrap: wrap; }
.charts img { max-width: 100%; }
.gallery { display: flex; gap: 1em; flex-wrap: wrap; }
.gallery figure { margin: 0; text-align: center; font-size: .85em; }
.gallery img { width: 84px; height: 84px; image-rendering: pixelated; border: 1px solid #ccc; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; }
code { font-size: .9em; }
"""


def read_scalars(event_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files directly inside `event_dir`."""
    from tensorboard.backend.event_processing import event_accumulator

    if not storage.is_dir(event_dir):
        return {}
    accumulator = event_accumulator.EventAccumulator(storage.tf_path(event_dir),
                                                     size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def misclassified(predictions_csv: str, limit: int = MISCLASSIFIED_SHOWN) -> list[dict]:
    """The most confidently wrong predictions: key, true and predicted label, and that probability."""
    wrong = []
    with io.StringIO(storage.read_text(predictions_csv), newline="") as handle:
        for row in map(read_record, csv.DictReader(handle)):
            if row["true_label"] and row["true_label"] != row["predicted_label"]:
                wrong.append({"key": row["key"], "true_label": row["true_label"],
                              "predicted_label": row["predicted_label"],
                              "probability": float(row[f"p_{row['predicted_label']}"])})
    wrong.sort(key=lambda item: (-item["probability"], item["key"]))
    return wrong[:limit]


def _encoded_images(shard_files: Sequence[str], keys: Iterable[str]) -> dict[str, bytes]:
    """The stored (already normalised) PNG of each key, read back from the TFRecord shards."""
    import tensorflow as tf

    from pipeline import schema

    wanted = set(keys)
    found: dict[str, bytes] = {}
    if not wanted:
        return found
    records = tf.data.TFRecordDataset([storage.tf_path(file) for file in shard_files]).map(schema.parse_example)
    for record in records.as_numpy_iterator():
        key = record[schema.KEY].decode("utf-8")
        if key in wanted:
            found[key] = bytes(record[schema.ENCODED])
            if len(found) == len(wanted):
                break
    return found


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]], numeric: bool = True) -> str:
    """A table whose columns after the first are right-aligned when `numeric`."""
    def cell(tag: str, index: int, value: object) -> str:
        css = ' class="num"' if numeric and index > 0 else ""
        return f"<{tag}{css}>{html.escape(str(value))}</{tag}>"
    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(*, title: str, metrics: dict, train: dict, versions: Mapping[str, str], model_sha256: str,
                  confusion_png: bytes, charts: Mapping[str, bytes], examples: Sequence[dict], blessing: Mapping,
                  lineage: str) -> str:
    """The HTML of one report, from plain values (see `write_report` for where they come from);
    `charts` maps each chart's title to its PNG, `blessing` is the verdict (blessing.json's content)
    and `lineage` its lineage as text."""
    verdict = "BLESSED" if blessing["blessed"] is True else "NOT BLESSED"
    cards = "".join(f'<div class="card">{html.escape(label)}<b>{html.escape(value)}</b></div>' for label, value in (
        ("accuracy", f"{metrics['accuracy']:.4f}"), ("loss", f"{metrics['loss']:.4f}"),
        ("examples", str(metrics["examples"])), ("global step", str(metrics["global_step"])), ("verdict", verdict)))
    checks = _table(("check", "result"), ((describe(check), check["result"]) for check in blessing["checks"]),
                    numeric=False) if blessing["checks"] else ""
    per_class = _table(("class", "precision", "recall", "F1", "support"),
                       ((name, f"{s['precision']:.4f}", f"{s['recall']:.4f}", f"{s['f1']:.4f}", s["support"])
                        for name, s in metrics["per_class"].items()))
    model_metrics = _table(("metric", "value"), ((name, value if isinstance(value, list) else f"{value:.4f}")
                                                 for name, value in metrics.get("model_metrics", {}).items()))
    figures = "".join(f'<img src="{_data_uri(png)}" alt="{html.escape(name)} over training">'
                      for name, png in charts.items()) or "<p>No curves were logged.</p>"
    gallery = "".join(
        f'<figure><img src="{_data_uri(e["png"])}" alt="{html.escape(e["key"])}">'
        f'<figcaption>true <b>{html.escape(e["true_label"])}</b><br>predicted <b>{html.escape(e["predicted_label"])}'
        f'</b> ({e["probability"]:.2f})<br><code>{html.escape(e["key"])}</code></figcaption></figure>'
        for e in examples) or "<p>No misclassified images.</p>"
    run = _table(("", "value"), [("model file", train["model_file"]), ("model code sha256", model_sha256),
                                 *((f"{stage} version", version) for stage, version in versions.items()),
                                 ("checkpoint", metrics["checkpoint"]), ("max_steps", train["max_steps"]),
                                 ("global step reached", train["global_step"]),
                                 ("best export (lowest validation loss)", train.get("best_export_dir") or "none"),
                                 ("batch_size", train["batch_size"]),
                                 ("tf_random_seed", train["run_config"]["tf_random_seed"])], numeric=False)
    generated = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<section id="metrics"><h2>Metrics on the {html.escape(metrics['split'])} split</h2><div class="cards">{cards}</div>
<h3>The model's own evaluation metrics</h3>{model_metrics}</section>
<section id="confusion"><h2>Confusion matrix</h2>
<img id="confusion-matrix" src="{_data_uri(confusion_png)}" alt="confusion matrix"></section>
<section id="per-class"><h2>Per class</h2>{per_class}</section>
<section id="curves"><h2>Training curves</h2><div class="charts">{figures}</div></section>
<section id="misclassified"><h2>Misclassified {html.escape(metrics['split'])} images (most confident first)</h2>
<div class="gallery">{gallery}</div></section>
<section id="run"><h2>Run</h2>{run}<h3>params</h3><pre>{html.escape(json.dumps(train['params'], indent=2, sort_keys=True))}</pre></section>
<section id="blessing"><h2>Verdict: {verdict}</h2><p>{html.escape(blessing['reason'])}</p>{checks}</section>
<section id="lineage"><h2>Lineage</h2><pre>{html.escape(lineage)}</pre>
<p>The same for any output, or what was made from a version: <code>python -m tasks.lineage PATH</code>,
<code>python -m tasks.lineage --downstream VERSION</code>.</p></section>
<p><small>Generated {generated}.</small></p>
</body></html>
"""


def write_report(run_dir: str, train_marker: str, metrics_path: str, predictions_csv: str,
                 shard_files: Sequence[str], report_path: str, *, versions: Mapping[str, str], blessing: Mapping,
                 lineage: str) -> None:
    """Gather one evaluation's results and write its report.html atomically.

    `versions` maps stage names to the versions shown (data and run); `shard_files` are the
    TFRecords of the evaluated split, where misclassified images are read back from; `blessing` and
    `lineage` are shown as they are given.
    """
    metrics = read_json(metrics_path)
    train = read_json(train_marker)
    model_dir = storage.join(run_dir, MODEL_DIR)
    # Evaluations on the validation split, while training and by Evaluate, share its event folder.
    scalars = {"train": read_scalars(model_dir),
               **{split: read_scalars(storage.join(model_dir, f"eval_{split}"))
                  for split in (VALIDATION, metrics["split"])}}
    charts = {tag: curves_png(tag, series, log_scale=tag == "loss") for tag in CHARTED_TAGS
              if (series := {name: found[tag] for name, found in scalars.items() if found.get(tag)})}
    examples = misclassified(predictions_csv)
    images = _encoded_images(shard_files, (e["key"] for e in examples))
    examples = [{**e, "png": images[e["key"]]} for e in examples if e["key"] in images]
    model_source = storage.read_bytes(storage.join(model_dir, MODEL_FILE))
    page = render_report(
        title=f"{storage.name(storage.parent(run_dir))} / {storage.name(run_dir)}: {train['model_file']} on "
              f"{metrics['split']}",
        metrics=metrics, train=train, versions=versions,
        model_sha256=hashlib.sha256(model_source).hexdigest(),
        confusion_png=storage.read_bytes(storage.join(storage.parent(metrics_path), CONFUSION_MATRIX_PNG)),
        charts=charts, examples=examples, blessing=blessing, lineage=lineage)
    write_bytes(report_path, page.encode("utf-8"))

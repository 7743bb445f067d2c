"""Drift of the reasoning rows: cosine distances over all N rows, computed a chunk of rows at a time so that a
full-size vocabulary fits in memory, and reduced to summaries; and a 2-D PCA of the few family rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from transformers import PreTrainedModel

from rlvr.vocab import ReasoningVocab

CHUNK_ROWS = 16384  # reasoning rows compared at once: a 16k x 1024 fp32 chunk is 64 MiB
QUANTILES = {"p05": 0.05, "median": 0.5, "p95": 0.95}


def embedding_matrices(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The matrices whose rows are traced: `input` and `output`, or one `tied` matrix sharing storage."""
    inputs = model.get_input_embeddings().weight.detach()
    output = model.get_output_embeddings()
    if output is None or output.weight.data_ptr() == inputs.data_ptr():
        return {"tied": inputs}
    return {"input": inputs, "output": output.weight.detach()}


def cosine_distance(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Row-wise 1 - cos in fp32, exactly 0 for identical rows (rounding would leave ~1e-7)."""
    distance = (1 - F.cosine_similarity(left.float(), right.float(), dim=-1)).clamp(min=0)
    return distance.masked_fill((left == right).all(-1), 0.0)


def twin_distances(weight: torch.Tensor, vocab: ReasoningVocab, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """(N,) distance of each reasoning row from its standard twin's row; only one chunk of rows is copied."""
    base = vocab.base_vocab_size
    twins = torch.tensor(vocab.standard_token_ids, device=weight.device)
    parts = [
        cosine_distance(
            weight[base + start : base + start + chunk_rows], weight[twins[start : start + chunk_rows]]
        )
        for start in range(0, vocab.size, chunk_rows)
    ]
    return torch.cat(parts).cpu() if parts else torch.zeros(0)


def start_distances(
    weight: torch.Tensor, start: torch.Tensor, vocab: ReasoningVocab, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """(N,) distance of each reasoning row from `start`, the same rows at the first checkpoint (on CPU)."""
    base = vocab.base_vocab_size
    parts = [
        cosine_distance(weight[base + i : base + i + chunk_rows], start[i : i + chunk_rows].to(weight.device))
        for i in range(0, vocab.size, chunk_rows)
    ]
    return torch.cat(parts).cpu() if parts else torch.zeros(0)


def summarise(distances: torch.Tensor) -> dict[str, float]:
    """Mean, spread (population std, quantiles) and max of distances over all rows."""
    values = distances.double()
    quantiles = torch.quantile(values, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {
        "rows": values.numel(),
        "mean": values.mean().item(),
        "std": values.std(correction=0).item(),
        **{name: q.item() for name, q in zip(QUANTILES, quantiles, strict=True)},
        "max": values.max().item(),
    }


def project(rows: pd.DataFrame) -> pd.DataFrame:
    """PC1/PC2 of embedding rows, PCA fitted on all rows of a panel: per matrix, all families together (`view`
    "all") and each family alone (`view` "family"), with each fit's explained-variance ratios."""
    frames = []
    for _, group in rows.groupby("matrix", sort=False):
        panels = [("all", group)] + [("family", g) for _, g in group.groupby("family", sort=False)]
        for view, panel in panels:
            coords, ratios = _pca(np.stack(panel["vector"].to_list()))
            frames.append(
                panel.drop(columns="vector").assign(
                    view=view, pc1=coords[:, 0], pc2=coords[:, 1], var_pc1=ratios[0], var_pc2=ratios[1]
                )
            )
    return pd.concat(frames, ignore_index=True)


def _pca(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two principal coordinates (zeros past the data's rank, all zeros for identical rows), their ratios."""
    coords, ratios = np.zeros((len(vectors), 2)), np.zeros(2)
    components = min(2, len(vectors), vectors.shape[1])
    if np.ptp(vectors, axis=0).max() > 0:
        pca = PCA(n_components=components, svd_solver="full").fit(vectors)
        coords[:, :components] = pca.transform(vectors)
        ratios[:components] = pca.explained_variance_ratio_
    return coords, ratios

"""How a reasoning vocabulary evolves over a training run: the numbers behind the `analyze` entry point.

Researchers ask how reasoning tokens drift from their standard twins. Each selected checkpoint of a training
run (and of a baseline run, for comparison) is loaded once and measured four ways:

- usage: constrained completions sampled on held-out prompts, and the share of their thought tokens that are
  reasoning ids, beside the share training itself logged per step (`reasoning/token_share`);
- drift: the cosine distance of every reasoning row from its standard twin's row (`twin`) and from its own
  row at the first analysed checkpoint (`start`), in the input and output embeddings, summarised over all N
  rows; and the rows of a few token families, projected to 2-D with PCA;
- entropy: the entropy of the constrained next-token distribution at positions inside thoughts, grouped by the
  token just read, teacher-forced on the data's worked solutions (on the samples when the data has none), so
  every checkpoint and both runs read the same text;
- one sampled completion, rendered with its reasoning tokens coloured.

The numbers are written as CSV/JSON beside their figures (`plots`) and logged as artifacts of an
`analyze` run, which is tagged with the runs it analysed; they get a tag pointing back at it.

The modules, in the order the job reads them:

- `runs`: which runs and checkpoints are analysed (`TrainingRun`, `resolve_run`), and the held-out prompts;
- `families`: which token families are traced (`token_families`: named by `tokens`, or the data's most
  frequent tokens);
- `usage`, `drift`, `entropy`: the measurements, one module each, named like the folders of their outputs;
- `plots`: the figures, drawn from the tables;
- `job`: `AnalyzeSettings`, the `Plan`, measuring each run checkpoint by checkpoint, writing and logging the
  outputs (the rendered completion included), and `analyze`, which does all of it.
"""

from rlvr.analysis.job import AnalyzeSettings, analyze

__all__ = ["AnalyzeSettings", "analyze"]

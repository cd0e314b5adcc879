"""Auto-search (paper §4.1): profiled op times + the layer graph -> a PipelineSpec.

``problem_from_graph`` builds a :class:`SearchProblem`; :func:`solve_stage1` picks nano-op counts, sizes and order
(MILP without interference); :func:`solve_stage2` picks each nano-op's resource share (MILP with the R -> P table);
``nanoflow.search.plot.plot_gantt`` draws the planned (and measured) pipeline.
"""

from __future__ import annotations

from nanoflow.search.problem import RP_TABLE_PAPER, OpNode, SearchError, SearchProblem, problem_from_graph
from nanoflow.search.stage1 import Stage1Result, solve_stage1
from nanoflow.search.stage2 import Stage2Result, solve_stage2

__all__ = [
    "RP_TABLE_PAPER",
    "OpNode",
    "SearchError",
    "SearchProblem",
    "Stage1Result",
    "Stage2Result",
    "problem_from_graph",
    "solve_stage1",
    "solve_stage2",
]

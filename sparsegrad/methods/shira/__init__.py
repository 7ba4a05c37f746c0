"""SHiRA (peft's sparse high-rank adapter: a fixed random sparse mask of W, trained in the original space)
on the target linears, at SparseGrad's budget.
"""

from sparsegrad.methods.shira.method import Shira, shira_rank

__all__ = ["Shira", "shira_rank"]

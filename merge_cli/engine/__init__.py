"""The streaming engine: the two kinds of method entry (:mod:`.method`), the plan made from
headers before any tensor is read (:mod:`.plan`), per-tensor parameter resolution
(:mod:`.params`), row-chunk helpers (:mod:`.chunks`), vocabulary matching (:mod:`.vocab`),
and the executor that streams a plan into the writer (:mod:`.executor`).

It knows no method by name: the fuse stage hands it a method entry.
"""

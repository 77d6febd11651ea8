"""The IR and what works on it: the op table, lowering, limits, inference, verification, passes, the interpreter.

`graph` holds the data structure (a networkx DiGraph of frozen `Node` records), `ops` every
fact about each op kind. Nothing here imports torch except the interpreter.
"""

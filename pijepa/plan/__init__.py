"""`pijepa plan`: memory, micro-batch, step time and communication per parallel strategy, from a
config alone. planner.py says how the parts fit together; costs/ holds one cost model per strategy."""

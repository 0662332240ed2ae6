"""Execution: the runner that turns a matrix into jobs, the workbench that runs one job (train,
evaluate, attack), the executors that ship jobs to workers (in process, a local pool, Ray), time
budgets, probes, shards and progress. It uses the defenses, the attacks, the store and the
foundation; nothing below it imports it."""

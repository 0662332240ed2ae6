"""robustmatrix's harness, in layers (each imports only the layers below it):

- ``bench.foundation`` — specs and registry, kwargs, keys, counting, data, models, matrix config;
- ``bench.storage`` — the results database and merging;
- ``bench.execution`` — runner, workbench, executors (uses ``defenses`` and ``attacks``);
- ``bench.commands`` — the CLI, ``check``, the scaffold and the nightly report.

``bench.registry`` is the public API plugins register with.
"""

__version__ = "0.1.0"

"""Everything that runs experiments, in three rooms (docs/architecture.md):

    orchestrator/*.py   the entry points: teachers, distill, bench, tune, diagnose_bn (each a
                        `python -m` CLI), their shared argument plumbing (cli.py), MLflow
                        tracking and the result tables
    orchestrator/runtime/   the Ray runtime: store, actors, driver, cluster
    orchestrator/core/      the plain-PyTorch core: round loop, cell builder, training, checkpoints
"""

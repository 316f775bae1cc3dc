"""corolla: federated LoRA fine-tuning on Flower.

This root package is the torch-free core that both sides import: the run
configuration (`corolla.config`), the task specification (`corolla.spec`), the
simulated fleet's per-node properties (`corolla.config.fleet`), logging and process
launch helpers, and the command line. `corolla.server`, `corolla.client`,
`corolla.strategies` and `corolla.proto` are its subpackages; dependencies point
one way: client → core, server → core + strategies (+ the client's training code
through the evaluator interface), never client → server.
"""

__version__ = "0.2.0"

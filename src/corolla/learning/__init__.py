"""What learns: tasks, base models, the one training/evaluation loop, and adapters exported for peft.

The torch layer both sides share: a site's trainer trains with it, and the server's
evaluator and `corolla export` use the same code, so a model is built one way only.
A task turns a silo's rows into examples and gives the model its head.
"""

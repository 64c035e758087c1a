"""The step runners, on top: what each steps/ command calls. runners (prepare_data, pretrain,
finetune, and the training run a tune trial is), evaluation_run (evaluate), chain (main: the steps
nested under one parent run), transfer (the transfer study: pretrain, fine-tune at each frozen depth,
scratch baseline, evaluate, under one parent run), tuning (tune: the Optuna trial loop), compare (the
comparison table).
The prune step's runner lives with pruning (pipeline.prune.pruning_run).

May import anything in the pipeline; nothing in the pipeline imports it.
"""

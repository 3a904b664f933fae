"""`bonsai finetune`: post-pruning recovery with LoRA (or full finetuning) and distillation from cached teacher logits."""

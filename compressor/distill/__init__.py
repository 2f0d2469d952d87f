"""Knowledge distillation (`compress distill`): a student learns a teacher's next-token
distribution on text, to heal what pruning took (Minitron, SliceGPT, MoDeGPT students)."""

"""Reading and writing models: one suffix-dispatch table, safe by default."""

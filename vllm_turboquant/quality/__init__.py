"""Quality measurement: built-in text, KV quantization schemes, teacher-forced simulation, metrics."""

"""What both steps train with: optimizer and schedule, fine-tuning, faults and resume, metrics, run records."""

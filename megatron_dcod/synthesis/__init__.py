"""Training data from prompts with a teacher and a student: teacher traces, MOTAB and SKD."""

"""Wire contract of infernode: subjects, messages, error codes. Imports nothing of ours."""

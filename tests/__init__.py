"""infernode tests; a package so tests can import tests.helpers."""

"""Patterns for names that travel in messages (request ids, worker ids, adapters, subjects)."""

REQUEST_ID_PATTERN = r"[A-Za-z0-9._:~-]{1,128}"
WORKER_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}"
SUBJECT_PATTERN = r"[^\s.*>]{1,256}(\.[^\s.*>]{1,256}){0,32}"

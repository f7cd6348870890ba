"""Deployment targets of the reranker service."""

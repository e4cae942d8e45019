"""Automated annotation of images from their radiology reports (001's section 3.3)."""

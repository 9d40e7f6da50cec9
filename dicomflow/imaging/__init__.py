"""Pixel data services shared by DICOMweb (WADO-RS) and DIMSE (C-MOVE/C-GET): transcoding, frames, rendering."""

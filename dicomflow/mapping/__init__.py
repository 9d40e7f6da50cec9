"""Declarative DICOM -> FHIR R4 mappings (mappings/*.yaml): a closed set of transforms, no code."""

"""DICOM: read any DICOM tree's headers, validate series, assemble volumes.

* :mod:`shiftguard.dicom.scan`: header-only scan of a tree (:class:`~.scan.SliceHeader`, one per
  image), never raising on bad files; one binary walker (dicom.binary) with a pydicom fallback.
* :mod:`shiftguard.dicom.series`: grouping, de-duplication, validation and assembly of a series into
  a volume with its RAS affine (:class:`~.series.SeriesVolume`).
* :mod:`shiftguard.dicom.pixels`: the pixel pass (native pixels read in place, RLE/JPEG-LS/JPEG 2000
  decoded through pydicom's plugins).
* :mod:`shiftguard.dicom.quarantine`: the quarantine report's entries (code, reason, fix); the
  typed errors are in :mod:`shiftguard.errors`.
* :mod:`shiftguard.dicom.testing`: a small writer of synthetic series for tests and benchmarks.
"""

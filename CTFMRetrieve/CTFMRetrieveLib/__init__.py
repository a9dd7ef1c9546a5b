"""CTFMRetrieveLib: the CT-FM Retrieve module's logic, without Qt (tested on slicer-core).

Lives in a sub-folder of the module folder, so Slicer's module scanner does not
take it for a module.
"""

"""patch() names modules that bound socket objects before it ran (argv[1]: early | clean)."""
import sys
import types
import warnings

if sys.argv[1] == "early":
    # What `from socket import create_connection, socket as Sock` in a legacy module does.
    legacy = types.ModuleType("legacy_client")
    exec("from socket import create_connection, socket as Sock", legacy.__dict__)
    sys.modules["legacy_client"] = legacy

import resilientsock  # noqa: E402

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    resilientsock.patch()
mine = [w for w in caught if w.category.__name__ == "ResilientsockPatchWarning"]
for w in mine:
    print("WARNING:", w.message)
print("warnings:", len(mine))

"""Code a compromised datasite might run, submitted by the tests (PySyft reads these functions' source).

``fedrec_train_round`` here has the approved function's name and signature but other source (so
another digest): it trains like the real one, then rewrites the client id in every payload header to
impersonate client 0. ``leak_rows`` returns the private rows themselves.
"""


def fedrec_train_round(data, owner, request):
    import struct

    from fedrec.deploy.training import train_round

    output = train_round(data, owner, request)
    if "update" in output:
        output["update"] = [p[:80] + struct.pack("<Q", 0) + p[88:] for p in output["update"]]
    return output


def leak_rows(data):
    return data


def count_rows(data):
    return {"rows": len(data["label"])}

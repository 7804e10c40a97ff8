//! A control-socket request line, as any local client may send it: the daemon decodes each
//! line with `serde_json::from_slice::<Request>` before anything else looks at it. Errors
//! are fine (the client gets `{"ok":false,...}`); a panic is a bug. Kept to the one call so
//! it follows `Request` wherever it lives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xvdpa::api::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        // What decodes (an add-port request's PortSpec is checked while it decodes, as a
        // `[[port]]` table is) must encode again, and decode to the same request.
        let line = serde_json::to_vec(&req).expect("a decoded request encodes");
        let again: Request = serde_json::from_slice(&line).expect("an encoded request decodes");
        assert_eq!(again, req);
    }
});

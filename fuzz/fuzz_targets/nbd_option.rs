//! One handshake option: the first 4 bytes are the option code (big
//! endian), the rest is the option's data, as `parse_option` sees them.
#![no_main]

use hablk::nbd::proto::{parse_option, ClientOption, MAX_META_QUERIES, MAX_STRING_BYTES};
use libfuzzer_sys::fuzz_target;

fn check_string(s: &str) {
    assert!(s.len() <= MAX_STRING_BYTES, "string over the spec's limit");
    assert!(!s.contains('\0'), "string with NUL accepted");
}

fuzz_target!(|input: &[u8]| {
    let Some((code, data)) = input.split_first_chunk::<4>() else {
        return;
    };
    let code = u32::from_be_bytes(*code);
    let Ok(option) = parse_option(code, data) else {
        return;
    };
    match option {
        ClientOption::ExportName(name) => check_string(&name),
        ClientOption::Info { export, requests } | ClientOption::Go { export, requests } => {
            check_string(&export);
            // Every byte is accounted for: name length, name, count, requests.
            assert_eq!(data.len(), 4 + export.len() + 2 + 2 * requests.len());
        }
        ClientOption::ListMetaContext { export, queries }
        | ClientOption::SetMetaContext { export, queries } => {
            check_string(&export);
            assert!(queries.len() <= MAX_META_QUERIES as usize);
            queries.iter().for_each(|q| check_string(q));
            let expected: usize =
                4 + export.len() + 4 + queries.iter().map(|q| 4 + q.len()).sum::<usize>();
            assert_eq!(data.len(), expected);
        }
        ClientOption::Unknown(other) => assert_eq!(other, code),
        ClientOption::Abort
        | ClientOption::List
        | ClientOption::StartTls
        | ClientOption::StructuredReply => {}
    }
});

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sleap_rtc_fuzz::upstream_codec(data);
});

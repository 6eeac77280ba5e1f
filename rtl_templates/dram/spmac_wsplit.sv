// spmac_wsplit: splits a layer's fetched region into its scale words and its weight words.
//
// The region is pass-major (docs/fpga.md): for every row pass a scale section (one scale word per
// quantization group) then a weight section (one weight word per beat), each padded to a 64-byte
// boundary. Bus words of a section's data go to that section's output (the last one with a tkeep of its
// data bytes), padding words are dropped. The walk repeats per token, then takes the next layer's
// geometry from s_cfg.

`default_nettype none

module spmac_wsplit #(
    parameter int DATA_W = 512,
    parameter int LEN_W  = 32,
    parameter int TOK_W  = 16,
    parameter int PASS_W = 16
) (
    input  wire logic              clk,
    input  wire logic              rst_n,
    input  wire logic              s_cfg_valid,
    output      logic              s_cfg_ready,
    input  wire logic [TOK_W-1:0]  s_cfg_tokens,
    input  wire logic [PASS_W-1:0] s_cfg_passes,
    input  wire logic [LEN_W-1:0]  s_cfg_sbytes,
    input  wire logic [LEN_W-1:0]  s_cfg_sstride,
    input  wire logic [LEN_W-1:0]  s_cfg_wbytes,
    input  wire logic [LEN_W-1:0]  s_cfg_wstride,
    // the fetched region, bus word by bus word
    input  wire logic              s_valid,
    output      logic              s_ready,
    input  wire logic [DATA_W-1:0] s_data,
    // scale section data
    output      logic              m_scale_valid,
    input  wire logic              m_scale_ready,
    output      logic [DATA_W-1:0] m_scale_data,
    output      logic [DATA_W/8-1:0] m_scale_keep,
    // weight section data
    output      logic              m_weight_valid,
    input  wire logic              m_weight_ready,
    output      logic [DATA_W-1:0] m_weight_data,
    output      logic [DATA_W/8-1:0] m_weight_keep
);
    localparam int DB   = DATA_W / 8;
    localparam int SIZE = $clog2(DB);

    initial if (DB < 1 || (1 << SIZE) != DB || DB > 64)
        $fatal(1, "spmac_wsplit: DATA_W must be a power of two of at most 512 bits, got %0d", DATA_W);

    logic              loaded;
    logic              weights;             // in the weight section (else the scale section)
    logic [LEN_W-1:0]  word;                // bus word within the section
    logic [PASS_W-1:0] pass, passes;
    logic [TOK_W-1:0]  token, tokens;
    logic [LEN_W-1:0]  data_words [2];      // per section: words holding data
    logic [LEN_W-1:0]  total_words [2];     // per section: words including the padding
    logic [DB-1:0]     tail_keep [2];       // per section: the bytes of its last data word

    function automatic logic [LEN_W-1:0] words_of(input logic [LEN_W-1:0] bytes);
        return (bytes + LEN_W'(DB - 1)) >> SIZE;
    endfunction
    function automatic logic [DB-1:0] keep_of(input logic [LEN_W-1:0] bytes);
        logic [SIZE:0] tail = (SIZE+1)'(bytes - ((words_of(bytes) - 1'b1) << SIZE));   // 1..DB
        return tail == (SIZE+1)'(DB) ? '1 : DB'((DB+1)'(1) << tail) - DB'(1);
    endfunction

    wire logic sec = weights;
    wire logic is_data  = word < data_words[sec];
    wire logic is_tail  = word == data_words[sec] - 1'b1;
    wire logic sec_end  = word == total_words[sec] - 1'b1;
    wire logic out_ready = sec ? m_weight_ready : m_scale_ready;

    assign s_cfg_ready = !loaded;
    assign s_ready = loaded && (!is_data || out_ready);
    wire logic fire = s_valid && s_ready;

    assign m_scale_valid  = loaded && s_valid && is_data && !sec;
    assign m_weight_valid = loaded && s_valid && is_data && sec;
    assign m_scale_data   = s_data;
    assign m_weight_data  = s_data;
    assign m_scale_keep   = is_tail ? tail_keep[0] : '1;
    assign m_weight_keep  = is_tail ? tail_keep[1] : '1;

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            loaded <= 1'b0; weights <= 1'b0; word <= '0; pass <= '0; passes <= '0; token <= '0; tokens <= '0;
            data_words[0] <= '0; data_words[1] <= '0; total_words[0] <= '0; total_words[1] <= '0;
            tail_keep[0] <= '0; tail_keep[1] <= '0;
        end else if (!loaded) begin
            if (s_cfg_valid) begin
                loaded <= 1'b1; weights <= 1'b0; word <= '0; pass <= '0; token <= '0;
                passes <= s_cfg_passes; tokens <= s_cfg_tokens;
                data_words[0] <= words_of(s_cfg_sbytes); total_words[0] <= s_cfg_sstride >> SIZE;
                data_words[1] <= words_of(s_cfg_wbytes); total_words[1] <= s_cfg_wstride >> SIZE;
                tail_keep[0] <= keep_of(s_cfg_sbytes); tail_keep[1] <= keep_of(s_cfg_wbytes);
            end
        end else if (fire) begin
            word <= sec_end ? '0 : word + 1'b1;
            if (sec_end) begin
                weights <= !weights;
                if (weights) begin
                    pass <= (pass == passes - 1'b1) ? '0 : pass + 1'b1;
                    if (pass == passes - 1'b1) begin
                        token <= token + 1'b1;
                        if (token == tokens - 1'b1) loaded <= 1'b0;
                    end
                end
            end
        end
endmodule

`default_nettype wire

// spmac_fetch: the sequencer's fetch side. Walks the descriptor table in DRAM and streams every layer's
// weights, without the host between layers.
//
// On `start` (table address, layer count, tokens per layer) it reads descriptor l (64 bytes, tag 1),
// checks it, hands the layer's geometry to the datapath (m_cfg), then requests the layer's region once
// per token (tag 0: the array consumes a layer's whole weight stream per token), then moves to the next
// descriptor. Requests run ahead of the array as far as the read master's room allows, so the next
// layer's descriptor and first weights are fetched while the current layer computes.
//
// Descriptor (little-endian; layout in docs/fpga.md): [0] u64 region base, [8] u32 K, [12] u32 rows,
// [16] u32 passes, [20] u32 beats per row, [24] u32 shift, [28] u32 scale bytes per pass,
// [32] u32 scale stride per pass, [36] u32 weight bytes per pass, [40] u32 weight stride per pass,
// [44] u32 region bytes per token, [48] u32 magic. A descriptor that disagrees with this design stops
// the run with `err_desc` set.

`default_nettype none

module spmac_fetch #(
    parameter int ADDR_W     = 32,
    parameter int DATA_W     = 512,
    parameter int LEN_W      = 32,
    parameter int LAYER_W    = 16,
    parameter int TOK_W      = 16,
    parameter int PASS_W     = 16,
    parameter int BPR_W      = 16,
    parameter int SHW        = 5,
    parameter int BPR_MAX    = 128,
    parameter int PASSES_MAX = 65535,
    parameter int BPG        = 4,        // beats per quantization group (one scale word per group)
    parameter int MAX_SHIFT  = 31,
    parameter int WBYTES     = 48,       // bytes of one weight word (every PE's slots of one beat)
    parameter int SBYTES     = 16        // bytes of one scale word (every PE's scale of one group)
) (
    input  wire logic               clk,
    input  wire logic               rst_n,
    input  wire logic               start_valid,
    output      logic               start_ready,
    input  wire logic [ADDR_W-1:0]  start_table,
    input  wire logic [LAYER_W-1:0] start_layers,
    input  wire logic [TOK_W-1:0]   start_tokens,
    // requests to the read master
    output      logic               m_cmd_valid,
    input  wire logic               m_cmd_ready,
    output      logic [ADDR_W-1:0]  m_cmd_addr,
    output      logic [LEN_W-1:0]   m_cmd_bytes,
    output      logic               m_cmd_tag,     // 1: descriptor, 0: weights
    // descriptor words back from the read master
    input  wire logic               s_desc_valid,
    output      logic               s_desc_ready,
    input  wire logic [DATA_W-1:0]  s_desc_data,
    // one layer's geometry for the datapath
    output      logic               m_cfg_valid,
    input  wire logic               m_cfg_ready,
    output      logic               m_cfg_last,    // the run's last layer
    output      logic [TOK_W-1:0]   m_cfg_tokens,
    output      logic [PASS_W-1:0]  m_cfg_passes,
    output      logic [BPR_W-1:0]   m_cfg_bpr,
    output      logic [SHW-1:0]     m_cfg_shift,
    output      logic [LEN_W-1:0]   m_cfg_sbytes,
    output      logic [LEN_W-1:0]   m_cfg_sstride,
    output      logic [LEN_W-1:0]   m_cfg_wbytes,
    output      logic [LEN_W-1:0]   m_cfg_wstride,
    output      logic               busy,
    output      logic               err_desc
);
    localparam logic [31:0] MAGIC = 32'h444D_5053;   // "SPMD"
    localparam int DESC_BYTES = 64;
    localparam int DESC_WORDS = DESC_BYTES * 8 / DATA_W;

    initial begin
        if (DATA_W > DESC_BYTES * 8) $fatal(1, "spmac_fetch: DATA_W=%0d is wider than a 64-byte descriptor", DATA_W);
        if (BPR_MAX < 1 || BPG < 1 || BPR_MAX % BPG != 0) $fatal(1, "spmac_fetch: BPR_MAX must be a multiple of BPG");
        if ($clog2(BPR_MAX + 1) > BPR_W || $clog2(PASSES_MAX + 1) > PASS_W) $fatal(1, "spmac_fetch: counter widths too narrow");
        if (ADDR_W < 12 || ADDR_W > 48) $fatal(1, "spmac_fetch: ADDR_W must be in 12..48, got %0d", ADDR_W);
        if ($clog2(MAX_SHIFT + 1) > SHW) $fatal(1, "spmac_fetch: SHW cannot hold MAX_SHIFT");
    end

    typedef enum logic [2:0] {IDLE, DESC_CMD, DESC_RX, CHECK, CFG, DATA} state_t;
    state_t state;

    logic [ADDR_W-1:0]  table_addr;
    logic [LAYER_W-1:0] layers, layer;
    logic [TOK_W-1:0]   tokens, token;
    logic [DESC_BYTES*8-1:0] desc;
    logic [7:0]         desc_words;
    logic [ADDR_W-1:0]  region;
    logic [LEN_W-1:0]   region_bytes;

    function automatic logic [31:0] field32(input logic [DESC_BYTES*8-1:0] d, input int offset);
        return d[offset*8 +: 32];
    endfunction

    wire logic [63:0] d_base    = desc[63:0];
    wire logic [31:0] d_passes  = field32(desc, 16);
    wire logic [31:0] d_bpr     = field32(desc, 20);
    wire logic [31:0] d_shift   = field32(desc, 24);
    wire logic [31:0] d_sbytes  = field32(desc, 28);
    wire logic [31:0] d_sstride = field32(desc, 32);
    wire logic [31:0] d_wbytes  = field32(desc, 36);
    wire logic [31:0] d_wstride = field32(desc, 40);
    wire logic [31:0] d_bytes   = field32(desc, 44);
    wire logic [31:0] d_magic   = field32(desc, 48);
    wire logic [63:0] d_region  = 64'(d_passes) * 64'(d_sstride + d_wstride);

    // the descriptor must describe a layer this design runs, in the image layout it reads
    wire logic desc_ok = d_magic == MAGIC
        && d_passes >= 32'd1 && d_passes <= 32'(PASSES_MAX)
        && d_bpr >= 32'd1 && d_bpr <= 32'(BPR_MAX) && d_bpr % 32'(BPG) == 32'd0
        && d_shift >= 32'd1 && d_shift <= 32'(MAX_SHIFT)
        && d_sbytes == d_bpr / 32'(BPG) * 32'(SBYTES) && d_wbytes == d_bpr * 32'(WBYTES)
        && d_sstride >= d_sbytes && d_wstride >= d_wbytes
        && d_sstride[5:0] == 6'd0 && d_wstride[5:0] == 6'd0 && d_base[5:0] == 6'd0
        && d_region == 64'(d_bytes) && d_region < (64'd1 << LEN_W) && d_base < (64'd1 << ADDR_W);

    assign start_ready  = state == IDLE;
    assign busy         = state != IDLE;
    assign s_desc_ready = state == DESC_RX;
    assign m_cmd_valid  = state == DESC_CMD || state == DATA;
    assign m_cmd_addr   = state == DESC_CMD ? table_addr + ADDR_W'(layer) * ADDR_W'(DESC_BYTES) : region;
    assign m_cmd_bytes  = state == DESC_CMD ? LEN_W'(DESC_BYTES) : region_bytes;
    assign m_cmd_tag    = state == DESC_CMD;
    assign m_cfg_valid  = state == CFG;

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) begin
            state <= IDLE; table_addr <= '0; layers <= '0; layer <= '0; tokens <= '0; token <= '0;
            desc <= '0; desc_words <= '0; region <= '0; region_bytes <= '0; err_desc <= 1'b0;
            m_cfg_last <= 1'b0; m_cfg_tokens <= '0; m_cfg_passes <= '0; m_cfg_bpr <= '0; m_cfg_shift <= '0;
            m_cfg_sbytes <= '0; m_cfg_sstride <= '0; m_cfg_wbytes <= '0; m_cfg_wstride <= '0;
        end else begin
            case (state)
                IDLE: if (start_valid && start_layers != '0 && start_tokens != '0) begin
                    table_addr <= start_table; layers <= start_layers; tokens <= start_tokens;
                    layer <= '0; state <= DESC_CMD;
                end
                DESC_CMD: if (m_cmd_ready) begin
                    desc_words <= '0; state <= DESC_RX;
                end
                DESC_RX: if (s_desc_valid) begin
                    desc <= (desc >> DATA_W) | ((DESC_BYTES*8)'(s_desc_data) << (DESC_BYTES*8 - DATA_W));
                    desc_words <= desc_words + 1'b1;
                    if (desc_words == 8'(DESC_WORDS - 1)) state <= CHECK;
                end
                CHECK: if (desc_ok) begin
                    region <= ADDR_W'(d_base); region_bytes <= LEN_W'(d_region);
                    m_cfg_last <= layer == layers - 1'b1; m_cfg_tokens <= tokens;
                    m_cfg_passes <= PASS_W'(d_passes); m_cfg_bpr <= BPR_W'(d_bpr); m_cfg_shift <= SHW'(d_shift);
                    m_cfg_sbytes <= LEN_W'(d_sbytes); m_cfg_sstride <= LEN_W'(d_sstride);
                    m_cfg_wbytes <= LEN_W'(d_wbytes); m_cfg_wstride <= LEN_W'(d_wstride);
                    state <= CFG;
                end else begin
                    err_desc <= 1'b1; state <= IDLE;
                end
                CFG: if (m_cfg_ready) begin
                    token <= '0; state <= DATA;
                end
                DATA: if (m_cmd_ready) begin
                    token <= token + 1'b1;
                    if (token == tokens - 1'b1) begin
                        layer <= layer + 1'b1;
                        state <= (layer == layers - 1'b1) ? IDLE : DESC_CMD;
                    end
                end
                default: state <= IDLE;
            endcase
        end

    wire logic unused = ^{desc[8*8 +: 64], desc[DESC_BYTES*8-1:52*8]};   // K and rows: for people and tools
endmodule

`default_nettype wire
